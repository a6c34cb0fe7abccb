{{/*
Names and labels, as the common charts write them.
*/}}

{{- define "firstmile.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The full name: <release>-<chart>, or the release name alone when it already contains the chart name.
Trimmed to 40 characters, so that "<fullname>-<longest component suffix>" and the Service KubeRay
derives from the RayService ("<fullname>-inference-serve-svc") stay within 63.
*/}}
{{- define "firstmile.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "firstmile.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "firstmile.selectorLabels" -}}
app.kubernetes.io/name: {{ include "firstmile.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "firstmile.labels" -}}
helm.sh/chart: {{ include "firstmile.chart" . }}
{{ include "firstmile.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: firstmile
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Labels of one component. Call with (dict "ctx" $ "component" "api") and optionally "group" (a consumer group).
*/}}
{{- define "firstmile.componentSelectorLabels" -}}
{{ include "firstmile.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- with .group }}
firstmile.io/consumer-group: {{ . }}
{{- end }}
{{- end -}}

{{- define "firstmile.componentLabels" -}}
{{ include "firstmile.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- with .group }}
firstmile.io/consumer-group: {{ . }}
{{- end }}
{{- end -}}

{{/*
The Prometheus job of a component's targets (the monitors take it from the firstmile.io/job label):
<fullname>-api, <fullname>-relay, <fullname>-consumer-<group>, <fullname>-scheduler, <fullname>-sequencer.
*/}}
{{- define "firstmile.job" -}}
{{- $fullname := include "firstmile.fullname" .ctx -}}
{{- if .group -}}
{{- printf "%s-%s-%s" $fullname .component .group | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" $fullname .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "firstmile.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Annotations of a workload object: the common ones, and the checks of kube-score and checkov that the
chart's choices fail on purpose, each switched off with its reason only when that choice is in force.
Call with (dict "ctx" $ "image" .Values.image).
*/}}
{{- define "firstmile.workloadAnnotations" -}}
{{- $ctx := .ctx -}}
{{- $annotations := deepCopy ($ctx.Values.commonAnnotations | default dict) -}}
{{- $skips := list -}}
{{- if ne .image.pullPolicy "Always" -}}
{{- $_ := set $annotations "kube-score/ignore" "container-image-pull-policy" -}}
{{- $_ := set $annotations "firstmile.io/kube-score-ignore-reason" "Images are pinned by an immutable tag or digest (ECR tag immutability): pulling again gains nothing and would make every pod start depend on the registry. Set image.pullPolicy: Always to check pull credentials on each start." -}}
{{- $skips = append $skips "CKV_K8S_15=image.pullPolicy IfNotPresent: tags are immutable (see firstmile.io/kube-score-ignore-reason)" -}}
{{- end -}}
{{- if not .image.digest -}}
{{- $skips = append $skips "CKV_K8S_43=image.digest is empty: the image is pinned by its immutable release tag; set image.digest to pin the digest" -}}
{{- end -}}
{{- if $ctx.Values.secrets.existingSecret -}}
{{- $skips = append $skips "CKV_K8S_35=The platform reads its settings from FIRSTMILE_* variables; with vault.enabled they come from a file (FIRSTMILE_ENV_FILE) instead" -}}
{{- end -}}
{{- if $ctx.Values.vault.enabled -}}
{{- $skips = append $skips "CKV_K8S_38=The Vault Agent init container logs in to Vault with the pod's service account token (Kubernetes auth)" -}}
{{- end -}}
{{- range $i, $skip := $skips -}}
{{- $_ := set $annotations (printf "checkov.io/skip%d" (add1 $i)) $skip -}}
{{- end -}}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The values of a component by its name (consumer -> .Values.consumers).
*/}}
{{- define "firstmile.componentValues" -}}
{{- $key := ternary "consumers" .component (eq .component "consumer") -}}
{{- toYaml (index .ctx.Values $key) -}}
{{- end -}}

{{/*
Service account of a component: (dict "ctx" $ "component" "api"): <fullname>-api, -relay, -consumers,
-scheduler, -sequencer, -inference, -migrations.
*/}}
{{- define "firstmile.serviceAccountName" -}}
{{- $values := fromYaml (include "firstmile.componentValues" .) -}}
{{- $sa := $values.serviceAccount -}}
{{- if $sa.create -}}
{{- /* The names the Terraform region module's IRSA roles trust by default (var.service_accounts). */ -}}
{{- $suffix := ternary "consumers" .component (eq .component "consumer") -}}
{{- default (printf "%s-%s" (include "firstmile.fullname" .ctx) $suffix) $sa.name -}}
{{- else -}}
{{- default "default" $sa.name -}}
{{- end -}}
{{- end -}}

{{/*
An image reference: (dict "image" .Values.image "ctx" $). The digest pins it when given.
*/}}
{{- define "firstmile.image" -}}
{{- $repo := .image.repository -}}
{{- if .image.registry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .image.registry) .image.repository -}}
{{- end -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" $repo $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{- define "firstmile.inferenceName" -}}
{{- printf "%s-inference" (include "firstmile.fullname" .) -}}
{{- end -}}

{{/*
The Service KubeRay puts in front of the Serve proxies of a RayService.
*/}}
{{- define "firstmile.inferenceUrl" -}}
{{- printf "http://%s-serve-svc:8000" (include "firstmile.inferenceName" .) -}}
{{- end -}}

{{- define "firstmile.modelsClaim" -}}
{{- default (printf "%s-models" (include "firstmile.fullname" .)) .Values.models.persistence.existingClaim -}}
{{- end -}}

{{- define "firstmile.configName" -}}
{{- printf "%s-config" (include "firstmile.fullname" .) -}}
{{- end -}}

{{/*
Which components read the model registry (and get the models volume): the path planner in the API,
the stuck detector in the scheduler.
*/}}
{{- define "firstmile.readsModels" -}}
{{- if and .ctx.Values.models.persistence.enabled (has .component (list "api" "scheduler")) -}}true{{- end -}}
{{- end -}}

{{- /* The scheduler trains tenant models on the chart's Ray cluster, through the head's Ray Client port. */ -}}
{{- define "firstmile.trainsOnRay" -}}
{{- if and .ctx.Values.inference.enabled (dig "training" "enabled" false .ctx.Values.inference) (eq .component "scheduler") -}}true{{- end -}}
{{- end -}}

{{- define "firstmile.trainingRayAddress" -}}
{{- printf "ray://%s-head-svc:10001" (include "firstmile.inferenceName" .) -}}
{{- end -}}

{{- define "firstmile.callsInference" -}}
{{- if and .ctx.Values.inference.enabled (has .component (list "api" "scheduler")) -}}true{{- end -}}
{{- end -}}

{{/*
Vault Agent Injector annotations: the init container renders the secret as dotenv lines into
/vault/secrets/firstmile.env (and each of vault.files into its own file), then exits.
*/}}
{{- define "firstmile.vaultAnnotations" -}}
{{- $v := .Values.vault -}}
{{- $data := ternary ".Data.data" ".Data" (eq (int $v.kvVersion) 2) -}}
vault.hashicorp.com/agent-inject: "true"
vault.hashicorp.com/agent-pre-populate-only: "true"
vault.hashicorp.com/role: {{ $v.role | quote }}
{{- with $v.authPath }}
vault.hashicorp.com/auth-path: {{ . | quote }}
{{- end }}
{{- with $v.namespace }}
vault.hashicorp.com/namespace: {{ . | quote }}
{{- end }}
vault.hashicorp.com/agent-inject-secret-firstmile.env: {{ $v.secretPath | quote }}
vault.hashicorp.com/agent-inject-perms-firstmile.env: "0400"
{{- /*
Vault Agent templates (Consul Template syntax), built as strings so Helm leaves them alone. Each field
becomes KEY='value': inside single quotes FIRSTMILE_ENV_FILE's dotenv parser takes spaces, `#` and
newlines literally; a backslash and a single quote are escaped for it.
*/}}
{{- $dotenv := printf `{{ with secret "%s" }}{{ range $k, $v := %s }}{{ $k }}='{{ printf "%%v" $v | replaceAll "\\" "\\\\" | replaceAll "'" "\\'" }}'
{{ end }}{{ end }}` $v.secretPath $data }}
vault.hashicorp.com/agent-inject-template-firstmile.env: {{ $dotenv | quote }}
{{- range $file, $path := $v.files }}
vault.hashicorp.com/agent-inject-secret-{{ $file }}: {{ $path | quote }}
vault.hashicorp.com/agent-inject-perms-{{ $file }}: "0400"
vault.hashicorp.com/agent-inject-template-{{ $file }}: {{ printf "{{ with secret %q }}{{ %s.value }}{{ end }}" $path $data | quote }}
{{- end }}
{{- with $v.annotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod annotations of a platform component: config checksum, Vault, the component's own.
*/}}
{{- define "firstmile.podAnnotations" -}}
{{- $values := fromYaml (include "firstmile.componentValues" .) -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
{{- if .ctx.Values.vault.enabled }}
{{ include "firstmile.vaultAnnotations" .ctx }}
{{- end }}
{{- with $values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Environment of a platform container: what the chart decides (it wins over the ConfigMap and the Secret,
which come through envFrom).
*/}}
{{- define "firstmile.env" -}}
- name: FIRSTMILE_SERVICE_NAME
  value: {{ (.group | empty | ternary (printf "firstmile-%s" .component) (printf "firstmile-%s-%s" .component .group)) | quote }}
- name: FIRSTMILE_DATA_DIR
  value: /tmp/firstmile
- name: HOME
  value: /tmp
{{- if .ctx.Values.vault.enabled }}
- name: FIRSTMILE_ENV_FILE
  value: /vault/secrets/firstmile.env
{{- end }}
{{- if include "firstmile.callsInference" . }}
- name: FIRSTMILE_INFERENCE_URL
  value: {{ include "firstmile.inferenceUrl" .ctx | quote }}
{{- end }}
{{- if include "firstmile.readsModels" . }}
- name: FIRSTMILE_MODEL_REGISTRY_URI
  value: file:///var/lib/firstmile/models
{{- end }}
{{- if include "firstmile.trainsOnRay" . }}
- name: FIRSTMILE_TRAINING_RAY_ADDRESS
  value: {{ include "firstmile.trainingRayAddress" .ctx | quote }}
{{- end }}
{{- if eq .component "api" }}
- name: FIRSTMILE_IN_PROCESS_SCHEDULERS
  value: "false"
{{- /* The sequencer Deployment places the audit entries; without it, the API pods do. */}}
- name: FIRSTMILE_IN_PROCESS_SEQUENCER
  value: {{ (not .ctx.Values.sequencer.enabled) | toString | quote }}
- name: FIRSTMILE_WORKERS
  value: {{ .ctx.Values.api.workers | quote }}
{{- else if ne .component "migrations" }}
- name: FIRSTMILE_PROBE_HOST
  value: 0.0.0.0
- name: FIRSTMILE_PROBE_PORT
  value: "9090"
{{- end }}
{{- end -}}

{{- define "firstmile.envFrom" -}}
- configMapRef:
    name: {{ include "firstmile.configName" . }}
{{- with .Values.secrets.existingSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- end -}}

{{- define "firstmile.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .ctx.Values.secrets.files.existingSecret }}
- name: secret-files
  mountPath: {{ .ctx.Values.secrets.files.mountPath }}
  readOnly: true
{{- end }}
{{- if include "firstmile.readsModels" . }}
- name: models
  mountPath: /var/lib/firstmile/models
  readOnly: true
{{- end }}
{{- end -}}

{{- define "firstmile.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .ctx.Values.tmpVolume.sizeLimit }}
{{- with .ctx.Values.secrets.files.existingSecret }}
- name: secret-files
  secret:
    secretName: {{ . }}
    defaultMode: 0400
{{- end }}
{{- if include "firstmile.readsModels" . }}
- name: models
  persistentVolumeClaim:
    claimName: {{ include "firstmile.modelsClaim" .ctx }}
    readOnly: true
{{- end }}
{{- end -}}

{{/*
Topology spread of a set of pods: (dict "ctx" $ "selector" <labels as a YAML string>).
matchLabelKeys keeps a rollout's new pods from being counted against the old ReplicaSet's.
*/}}
{{- define "firstmile.topologySpread" -}}
{{- $spread := .ctx.Values.topologySpread -}}
{{- $selector := .selector -}}
{{- $deployment := .deployment -}}
{{- range $name := list "zone" "host" }}
{{- $c := index $spread $name }}
{{- if $c.enabled }}
- topologyKey: {{ $c.topologyKey }}
  maxSkew: {{ $c.maxSkew }}
  whenUnsatisfiable: {{ $c.whenUnsatisfiable }}
  labelSelector:
    matchLabels:
      {{- $selector | nindent 6 }}
  {{- if $deployment }}
  matchLabelKeys:
    - pod-template-hash
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Probes of a component on an HTTP port: (dict "probes" .probes "port" "http").
*/}}
{{- define "firstmile.probes" -}}
startupProbe:
  httpGet:
    path: /health/live
    port: {{ .port }}
  {{- toYaml .probes.startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /health/live
    port: {{ .port }}
  {{- toYaml .probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /health/ready
    port: {{ .port }}
  {{- toYaml .probes.readiness | nindent 2 }}
{{- end -}}


{{- define "firstmile.consumersEnabled" -}}
{{- $any := false -}}
{{- range $name, $group := .Values.consumers.groups -}}
{{- if $group.enabled -}}{{- $any = true -}}{{- end -}}
{{- end -}}
{{- if $any -}}true{{- end -}}
{{- end -}}

{{/*
Whether a component is deployed: (dict "ctx" $ "component" "relay").
*/}}
{{- define "firstmile.enabled" -}}
{{- if eq .component "consumer" -}}
{{- include "firstmile.consumersEnabled" .ctx -}}
{{- else if eq .component "api" -}}
true
{{- else -}}
{{- if (index .ctx.Values .component).enabled -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{/*
A Deployment of the platform image: (dict "ctx" $ "component" "relay" "group" "" "values" .Values.relay
"args" (list "relay") "replicas" 2). The API listens on 8000 ("http"); workers serve their probes and
metrics on 9090 ("probe").
*/}}
{{- define "firstmile.deployment" -}}
{{- $ctx := .ctx -}}
{{- $values := .values -}}
{{- $isApi := eq .component "api" -}}
{{- $port := ternary 8000 9090 $isApi -}}
{{- $portName := ternary "http" "probe" $isApi -}}
{{- $sel := dict "ctx" $ctx "component" .component "group" .group -}}
{{- $name := include "firstmile.job" $sel -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ $name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "firstmile.componentLabels" $sel | nindent 4 }}
  {{- include "firstmile.workloadAnnotations" (dict "ctx" $ctx "image" $ctx.Values.image) | nindent 2 }}
spec:
  {{- if not (kindIs "invalid" .replicas) }}
  replicas: {{ .replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 25%
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "firstmile.componentSelectorLabels" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "firstmile.componentLabels" $sel | nindent 8 }}
        firstmile.io/job: {{ $name }}
        {{- with $values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "firstmile.podAnnotations" $sel | nindent 8 }}
    spec:
      serviceAccountName: {{ include "firstmile.serviceAccountName" $sel }}
      automountServiceAccountToken: {{ $ctx.Values.vault.enabled }}
      enableServiceLinks: false
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      securityContext:
        {{- toYaml $ctx.Values.podSecurityContext | nindent 8 }}
      {{- with $values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "firstmile.topologySpread" (dict "ctx" $ctx "selector" (include "firstmile.componentSelectorLabels" $sel) "deployment" true) }}
      topologySpreadConstraints:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "firstmile.image" (dict "image" $ctx.Values.image "ctx" $ctx) }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          command: ["firstmile"]
          args:
            {{- toYaml .args | nindent 12 }}
          ports:
            - name: {{ $portName }}
              containerPort: {{ $port }}
              protocol: TCP
          env:
            {{- include "firstmile.env" $sel | nindent 12 }}
          envFrom:
            {{- include "firstmile.envFrom" $ctx | nindent 12 }}
          {{- include "firstmile.probes" (dict "probes" $values.probes "port" $portName) | nindent 10 }}
          {{- if $isApi }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $values.preStopSleepSeconds }}
          {{- end }}
          resources:
            {{- toYaml (.resources | default $values.resources) | nindent 12 }}
          securityContext:
            {{- toYaml $ctx.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "firstmile.volumeMounts" $sel | nindent 12 }}
      volumes:
        {{- include "firstmile.volumes" $sel | nindent 8 }}
{{- end -}}

{{/*
A PodDisruptionBudget of a component: (dict "ctx" $ "component" "relay" "group" "" "pdb" .Values.relay.pdb).
*/}}
{{- define "firstmile.pdb" -}}
{{- $sel := dict "ctx" .ctx "component" .component "group" .group -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "firstmile.job" $sel }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "firstmile.componentLabels" $sel | nindent 4 }}
  {{- include "firstmile.annotations" .ctx | nindent 2 }}
spec:
  selector:
    matchLabels:
      {{- include "firstmile.componentSelectorLabels" $sel | nindent 6 }}
  {{- if ne (toString .pdb.minAvailable) "" }}
  minAvailable: {{ .pdb.minAvailable }}
  {{- end }}
  {{- if ne (toString .pdb.maxUnavailable) "" }}
  maxUnavailable: {{ .pdb.maxUnavailable }}
  {{- end }}
  # A pod that is not ready protects nothing: let a drain evict it.
  unhealthyPodEvictionPolicy: AlwaysAllow
{{- end -}}

{{/*
The pod spec of a Ray node: (dict "ctx" $ "node" "head"|"worker" "image" … "resources" … "nodeSelector" …
"tolerations" …). The probes are HTTP (Ray's own health endpoints), so the image needs no wget.
*/}}
{{- define "firstmile.rayPodSpec" -}}
{{- $ctx := .ctx -}}
{{- $inf := $ctx.Values.inference -}}
{{- $head := eq .node "head" -}}
serviceAccountName: {{ include "firstmile.serviceAccountName" (dict "ctx" $ctx "component" "inference") }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $ctx.Values.podSecurityContext | nindent 2 }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if not $head }}
{{- $selector := printf "%s\nfirstmile.io/ray-node: worker" (include "firstmile.componentSelectorLabels" (dict "ctx" $ctx "component" "inference")) }}
{{- with include "firstmile.topologySpread" (dict "ctx" $ctx "selector" $selector) }}
topologySpreadConstraints:
  {{- . | nindent 2 }}
{{- end }}
{{- end }}
containers:
  - name: {{ ternary "ray-head" "ray-worker" $head }}
    image: {{ .image }}
    imagePullPolicy: {{ $inf.image.pullPolicy }}
    env:
      - name: HOME
        value: /tmp
    ports:
      {{- if $head }}
      - name: gcs-server
        containerPort: 6379
      - name: dashboard
        containerPort: 8265
      - name: client
        containerPort: 10001
      {{- end }}
      - name: serve
        containerPort: 8000
      - name: metrics
        containerPort: 8080
    livenessProbe:
      httpGet:
        path: /api/local_raylet_healthz
        port: 52365
      initialDelaySeconds: 30
      periodSeconds: 5
      timeoutSeconds: 2
      failureThreshold: 120
    readinessProbe:
      httpGet:
        {{- if $head }}
        path: /api/gcs_healthz
        port: dashboard
        {{- else }}
        # A worker takes Serve traffic once its proxy is healthy.
        path: /-/healthz
        port: serve
        {{- end }}
      initialDelaySeconds: 10
      periodSeconds: 5
      timeoutSeconds: 2
      failureThreshold: 10
    resources:
      {{- toYaml .resources | nindent 6 }}
    securityContext:
      {{- toYaml $ctx.Values.containerSecurityContext | nindent 6 }}
    volumeMounts:
      - name: tmp
        mountPath: /tmp
      - name: models
        mountPath: /var/lib/firstmile/models
        readOnly: true
volumes:
  # Ray's session directory (/tmp/ray: logs, sockets, spilled objects); the root filesystem is read-only.
  - name: tmp
    emptyDir:
      sizeLimit: {{ .resources.limits | default dict | dig "ephemeral-storage" "4Gi" }}
  - name: models
    persistentVolumeClaim:
      claimName: {{ include "firstmile.modelsClaim" $ctx }}
      readOnly: true
{{- end -}}

{{/*
The head of a NetworkPolicy for some components of the release: (dict "ctx" $ "name" "dns" "components"
(list "api") "type" "Ingress"|"Egress"|"Ingress,Egress"). The caller writes the rules after it.
*/}}
{{- define "firstmile.networkPolicy" }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "firstmile.fullname" .ctx }}-{{ .name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "firstmile.labels" .ctx | nindent 4 }}
  {{- $annotations := deepCopy (.ctx.Values.commonAnnotations | default dict) }}
  {{- if eq (toJson .components) (toJson (list "inference")) }}
  {{- $_ := set $annotations "kube-score/ignore" "networkpolicy-targets-pod" }}
  {{- $_ := set $annotations "firstmile.io/kube-score-ignore-reason" "It selects the Ray head and worker pods, which KubeRay creates from the RayService's pod templates: kube-score does not read custom resources, so it sees no pod." }}
  {{- end }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  podSelector:
    matchLabels:
      {{- include "firstmile.selectorLabels" .ctx | nindent 6 }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values: {{ toJson .components }}
  policyTypes: {{ toJson (splitList "," .type) }}
{{- end }}
