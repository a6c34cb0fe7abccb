################################################################################
# Naming and tagging
################################################################################

variable "name" {
  description = "Name of the platform: the first part of every resource name (with environment)."
  type        = string
  default     = "firstmile"
  nullable    = false

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,11}$", var.name))
    error_message = "name must be 2 to 12 characters of lower-case letters, digits and hyphens, starting with a letter."
  }
}

variable "environment" {
  description = "Environment this region belongs to (production, staging, ...). Part of every resource name and of the tags."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z][a-z0-9]{1,11}$", var.environment))
    error_message = "environment must be 2 to 12 lower-case letters and digits, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource that takes tags (on top of the provider's default_tags)."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "log_retention_days" {
  description = "Retention of every CloudWatch log group of the region (VPC flow logs, EKS control plane, Aurora, MSK, Redis, WAF), in days."
  type        = number
  default     = 365
  nullable    = false

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be one of the retention periods CloudWatch Logs accepts: 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653."
  }
}

################################################################################
# Network
################################################################################

variable "vpc_cidr" {
  description = "IPv4 CIDR block of the region's VPC, /16 to /20. Three private subnets (nodes and pods) take 3/8 of it, three public and three database subnets 1/64 each. It must not overlap another region's block, so that the regions can be peered later."
  type        = string
  nullable    = false

  validation {
    condition = can(cidrnetmask(var.vpc_cidr)) && try(
      cidrhost(var.vpc_cidr, 0) == split("/", var.vpc_cidr)[0] &&
      tonumber(split("/", var.vpc_cidr)[1]) >= 16 &&
      tonumber(split("/", var.vpc_cidr)[1]) <= 20,
    false)
    error_message = "vpc_cidr must be an IPv4 network address in CIDR notation with a prefix from /16 to /20, such as 10.20.0.0/16."
  }
}

variable "availability_zone_names" {
  description = "The three availability zones to spread the region over. Empty: the first three zones of the region that need no opt-in."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = length(var.availability_zone_names) == 0 || length(distinct(var.availability_zone_names)) == 3
    error_message = "availability_zone_names must be empty (pick the first three zones) or name three different zones."
  }
}

################################################################################
# EKS
################################################################################

variable "eks" {
  description = <<-EOT
    The region's EKS cluster. The API endpoint is private unless endpoint_public_access is set,
    and then only reachable from public_access_cidrs. admin_principal_arns get cluster-admin
    through EKS access entries (the cluster creator gets nothing implicitly). general_nodes run
    the platform; gpu_nodes run the Ray GPU workers and carry the nvidia.com/gpu taint and the
    labels in outputs.gpu_node_selector, which the chart's inference values select.
  EOT
  type = object({
    kubernetes_version     = optional(string, "1.33")
    endpoint_public_access = optional(bool, false)
    public_access_cidrs    = optional(list(string), [])
    admin_principal_arns   = optional(list(string), [])
    general_nodes = optional(object({
      instance_types = optional(list(string), ["m7i.xlarge", "m6i.xlarge"])
      capacity_type  = optional(string, "ON_DEMAND")
      min_size       = optional(number, 3)
      desired_size   = optional(number, 3)
      max_size       = optional(number, 12)
      disk_size_gb   = optional(number, 100)
    }), {})
    gpu_nodes = optional(object({
      instance_types = optional(list(string), ["g6.xlarge", "g5.xlarge"])
      capacity_type  = optional(string, "ON_DEMAND")
      min_size       = optional(number, 1)
      desired_size   = optional(number, 1)
      max_size       = optional(number, 4)
      disk_size_gb   = optional(number, 200)
    }), {})
  })
  default  = {}
  nullable = false

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.eks.kubernetes_version))
    error_message = "eks.kubernetes_version must be a Kubernetes minor version such as 1.33."
  }

  validation {
    condition = !var.eks.endpoint_public_access || (
      length(var.eks.public_access_cidrs) > 0 &&
      alltrue([for c in var.eks.public_access_cidrs : can(cidrnetmask(c)) && c != "0.0.0.0/0"])
    )
    error_message = "eks.public_access_cidrs must list the CIDR blocks allowed to reach a public EKS endpoint, none of them 0.0.0.0/0."
  }

  validation {
    condition = alltrue([
      for g in [var.eks.general_nodes, var.eks.gpu_nodes] :
      g.min_size >= 0 && g.min_size <= g.desired_size && g.desired_size <= g.max_size && g.max_size >= 1
    ])
    error_message = "eks node groups need 0 <= min_size <= desired_size <= max_size and max_size >= 1."
  }

  validation {
    condition     = var.eks.general_nodes.min_size >= 2
    error_message = "eks.general_nodes.min_size must be at least 2, so that the API's PodDisruptionBudget can be met during a node replacement."
  }

  validation {
    condition = alltrue([
      for g in [var.eks.general_nodes, var.eks.gpu_nodes] :
      contains(["ON_DEMAND", "SPOT"], g.capacity_type) && g.disk_size_gb >= 20 && g.disk_size_gb <= 16384 && length(g.instance_types) > 0
    ])
    error_message = "eks node groups need capacity_type ON_DEMAND or SPOT, disk_size_gb from 20 to 16384 and at least one instance type."
  }
}

################################################################################
# Aurora PostgreSQL: the region's own database (tenant data stays in its home region)
################################################################################

variable "aurora" {
  description = <<-EOT
    The region's Aurora PostgreSQL cluster, which holds the tenants homed here and nothing else
    (docs/operations.md, "Regional routing"). The master password is generated and rotated by
    RDS in Secrets Manager; applications log in as their own roles (created by firstmile migrate)
    with passwords or IAM authentication. Aurora keeps backup_retention_days of point-in-time
    recovery; AWS Backup keeps a daily copy for aws_backup_retention_days in the region's vault.
  EOT
  type = object({
    engine_version                      = optional(string, "16.6")
    instance_class                      = optional(string, "db.r7g.large")
    instance_count                      = optional(number, 2)
    database_name                       = optional(string, "firstmile")
    master_username                     = optional(string, "firstmile_owner")
    backup_retention_days               = optional(number, 14)
    preferred_backup_window             = optional(string, "02:00-03:00")
    preferred_maintenance_window        = optional(string, "sun:04:00-sun:05:00")
    performance_insights_retention_days = optional(number, 7)
    monitoring_interval_seconds         = optional(number, 60)
    aws_backup_retention_days           = optional(number, 35)
  })
  default  = {}
  nullable = false

  validation {
    condition     = can(regex("^[0-9]{2}\\.[0-9]+$", var.aurora.engine_version))
    error_message = "aurora.engine_version must be an Aurora PostgreSQL version such as 16.6."
  }

  validation {
    condition     = var.aurora.instance_count >= 2 && var.aurora.instance_count <= 16 && floor(var.aurora.instance_count) == var.aurora.instance_count
    error_message = "aurora.instance_count must be a whole number from 2 to 16: a writer and at least one reader in another zone to fail over to."
  }

  validation {
    condition     = can(regex("^db\\.", var.aurora.instance_class))
    error_message = "aurora.instance_class must be an RDS instance class such as db.r7g.large."
  }

  validation {
    condition     = var.aurora.backup_retention_days >= 7 && var.aurora.backup_retention_days <= 35
    error_message = "aurora.backup_retention_days must be from 7 to 35."
  }

  validation {
    condition     = var.aurora.aws_backup_retention_days >= 7 && floor(var.aurora.aws_backup_retention_days) == var.aurora.aws_backup_retention_days
    error_message = "aurora.aws_backup_retention_days must be a whole number of days, at least 7."
  }

  validation {
    condition = (
      var.aurora.performance_insights_retention_days == 7 ||
      var.aurora.performance_insights_retention_days == 731 ||
      (var.aurora.performance_insights_retention_days % 31 == 0 && var.aurora.performance_insights_retention_days >= 31 && var.aurora.performance_insights_retention_days <= 713)
    )
    error_message = "aurora.performance_insights_retention_days must be 7, a multiple of 31 up to 713, or 731."
  }

  validation {
    condition     = contains([1, 5, 10, 15, 30, 60], var.aurora.monitoring_interval_seconds)
    error_message = "aurora.monitoring_interval_seconds must be 1, 5, 10, 15, 30 or 60 (Enhanced Monitoring stays on)."
  }

  validation {
    condition = alltrue([
      for n in [var.aurora.database_name, var.aurora.master_username] : can(regex("^[a-z_][a-z0-9_]{0,62}$", n))
    ])
    error_message = "aurora.database_name and aurora.master_username must be PostgreSQL identifiers: lower-case letters, digits and underscores, not starting with a digit."
  }
}

################################################################################
# The tenant directory: this region's member of the directory's Aurora global database
################################################################################

variable "directory" {
  description = <<-EOT
    This region's member of the tenant directory, the one database that every region shares
    (FIRSTMILE_DIRECTORY_URL: slug -> tenant id, home region). The global cluster is made by the
    global module; the region named primary holds its writer, every other region a read-only
    secondary that forwards writes to it (Aurora global write forwarding), so `tenants apply`
    works from any region and reads stay local. Backups follow aurora.backup_retention_days.
  EOT
  type = object({
    global_cluster_identifier = string
    role                      = string
    engine_version            = string
    database_name             = string
    master_username           = optional(string, "firstmile_directory_owner")
    master_password_version   = optional(number, 1)
    min_capacity_acu          = optional(number, 0.5)
    max_capacity_acu          = optional(number, 4)
  })
  nullable = false

  validation {
    condition     = contains(["primary", "secondary"], var.directory.role)
    error_message = "directory.role must be \"primary\" (the region holding the directory's writer) or \"secondary\"."
  }

  validation {
    condition = (
      var.directory.min_capacity_acu >= 0.5 && var.directory.max_capacity_acu <= 256 &&
      var.directory.min_capacity_acu <= var.directory.max_capacity_acu
    )
    error_message = "directory capacity must satisfy 0.5 <= min_capacity_acu <= max_capacity_acu <= 256 (Aurora Serverless v2 ACUs)."
  }

  validation {
    condition     = var.directory.master_password_version >= 1 && floor(var.directory.master_password_version) == var.directory.master_password_version
    error_message = "directory.master_password_version must be a whole number >= 1; raise it to set a newly generated master password."
  }
}

variable "directory_primary_cluster_arn" {
  description = "ARN of the directory's primary cluster (the primary region's output directory_primary_cluster_arn). Required in a secondary region: AWS attaches a secondary only once the primary has its writer, and this reference makes Terraform wait for it. Ignored in the primary region."
  type        = string
  default     = null

  validation {
    condition     = var.directory.role == "primary" || var.directory_primary_cluster_arn != null
    error_message = "directory_primary_cluster_arn must be set in a secondary region of the directory."
  }
}

################################################################################
# MSK
################################################################################

variable "msk" {
  description = <<-EOT
    The region's Kafka (MSK, provisioned). One broker per zone per brokers_per_zone. The platform
    authenticates with SASL/SCRAM-SHA-512 over TLS (port 9096) as the user in the secret
    outputs.msk_scram_secret_arn; operators may also use SASL/IAM over TLS (port 9098). Raise
    scram_password_version to store a newly generated SCRAM password.
  EOT
  type = object({
    kafka_version          = optional(string, "3.8.x")
    broker_instance_type   = optional(string, "kafka.m7g.large")
    brokers_per_zone       = optional(number, 1)
    broker_volume_size_gb  = optional(number, 500)
    scram_password_version = optional(number, 1)
  })
  default  = {}
  nullable = false

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.([0-9]+|x)(\\.tiered|\\.kraft)?$", var.msk.kafka_version))
    error_message = "msk.kafka_version must be an MSK Kafka version such as 3.8.x or 3.7.x.kraft."
  }

  validation {
    condition     = can(regex("^(kafka|express)\\.", var.msk.broker_instance_type))
    error_message = "msk.broker_instance_type must be an MSK broker type such as kafka.m7g.large."
  }

  validation {
    condition     = var.msk.brokers_per_zone >= 1 && floor(var.msk.brokers_per_zone) == var.msk.brokers_per_zone
    error_message = "msk.brokers_per_zone must be a whole number >= 1."
  }

  validation {
    condition     = var.msk.broker_volume_size_gb >= 1 && var.msk.broker_volume_size_gb <= 16384
    error_message = "msk.broker_volume_size_gb must be from 1 to 16384."
  }

  validation {
    condition     = var.msk.scram_password_version >= 1 && floor(var.msk.scram_password_version) == var.msk.scram_password_version
    error_message = "msk.scram_password_version must be a whole number >= 1; raise it to store a newly generated SCRAM password."
  }
}

variable "kafka_topic_prefix" {
  description = "FIRSTMILE_KAFKA_TOPIC_PREFIX of the platform: the Kafka IAM policies grant the workloads only the topics <prefix>.<region>.* and the groups <prefix>.<region>.*."
  type        = string
  default     = "firstmile"
  nullable    = false

  validation {
    condition     = can(regex("^[a-zA-Z0-9._-]{1,100}$", var.kafka_topic_prefix))
    error_message = "kafka_topic_prefix must be 1 to 100 characters of letters, digits, '.', '_' and '-', as FIRSTMILE_KAFKA_TOPIC_PREFIX."
  }
}

################################################################################
# ElastiCache Redis
################################################################################

variable "redis" {
  description = "The region's Redis (online features, admin sessions): one shard with replicas in the other zones, automatic failover, TLS and an AUTH token kept in Secrets Manager (FIRSTMILE_REDIS_URL=rediss://:<token>@<primary endpoint>:6379/0)."
  type = object({
    engine_version          = optional(string, "7.1")
    node_type               = optional(string, "cache.r7g.large")
    replicas                = optional(number, 2)
    snapshot_retention_days = optional(number, 7)
    auth_token_version      = optional(number, 1)
  })
  default  = {}
  nullable = false

  validation {
    condition     = can(regex("^cache\\.", var.redis.node_type))
    error_message = "redis.node_type must be an ElastiCache node type such as cache.r7g.large."
  }

  validation {
    condition     = var.redis.replicas >= 1 && var.redis.replicas <= 5 && floor(var.redis.replicas) == var.redis.replicas
    error_message = "redis.replicas must be a whole number from 1 to 5: Multi-AZ failover needs at least one replica."
  }

  validation {
    condition     = var.redis.snapshot_retention_days >= 1 && var.redis.snapshot_retention_days <= 35
    error_message = "redis.snapshot_retention_days must be from 1 to 35."
  }

  validation {
    condition     = var.redis.auth_token_version >= 1 && floor(var.redis.auth_token_version) == var.redis.auth_token_version
    error_message = "redis.auth_token_version must be a whole number >= 1; raise it to store a newly generated AUTH token."
  }
}

################################################################################
# S3: audit checkpoints and archives under Object Lock
################################################################################

variable "audit_bucket" {
  description = <<-EOT
    The region's audit bucket: signed audit checkpoints and log archives (docs/audit.md), under
    S3 Object Lock in COMPLIANCE mode, so that no one, the root user included, can delete or
    overwrite an object version before object_lock_retention_days have passed. Archives move
    to Glacier Instant Retrieval after archive_transition_days.
  EOT
  type = object({
    object_lock_retention_days = optional(number, 2557)
    archive_transition_days    = optional(number, 90)
  })
  default  = {}
  nullable = false

  validation {
    condition = (
      var.audit_bucket.object_lock_retention_days >= 1 &&
      var.audit_bucket.object_lock_retention_days <= 36500 &&
      floor(var.audit_bucket.object_lock_retention_days) == var.audit_bucket.object_lock_retention_days
    )
    error_message = "audit_bucket.object_lock_retention_days must be a whole number of days from 1 to 36500: COMPLIANCE mode needs a retention period, and it cannot be shortened once objects are written."
  }

  validation {
    condition     = var.audit_bucket.archive_transition_days >= 30
    error_message = "audit_bucket.archive_transition_days must be at least 30 (S3 moves objects to Glacier Instant Retrieval after 30 days at the earliest)."
  }
}

variable "access_log_retention_days" {
  description = "Days the region's log bucket keeps ALB and S3 server access logs."
  type        = number
  default     = 400
  nullable    = false

  validation {
    condition     = var.access_log_retention_days >= 90
    error_message = "access_log_retention_days must be at least 90."
  }
}

################################################################################
# The API endpoint and DNS
################################################################################

variable "dns" {
  description = <<-EOT
    The public zone (made by the global module) and the API names. Every region answers
    api.<domain> (a latency record: clients reach the nearest healthy region, which answers
    421 wrong-region for tenants homed elsewhere) and <region>.<api_name>.<domain>, its own
    name (FIRSTMILE_PUBLIC_URL of the region). owns_shared_validation makes this region write
    the ACM validation record of the shared name, which is the same in every region of an
    account: exactly one region of an environment must own it.
  EOT
  type = object({
    zone_id                = string
    domain_name            = string
    api_name               = optional(string, "api")
    owns_shared_validation = bool
  })
  nullable = false

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.dns.domain_name))
    error_message = "dns.domain_name must be a lower-case DNS name such as firstmile.example.com, without a trailing dot."
  }

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", var.dns.api_name))
    error_message = "dns.api_name must be a single DNS label such as api."
  }
}

variable "api_allowed_cidrs" {
  description = "CIDR blocks allowed to reach the API's load balancer on 443. The API is public by design; narrow this for a private deployment."
  type        = list(string)
  default     = ["0.0.0.0/0"]
  nullable    = false

  validation {
    condition     = length(var.api_allowed_cidrs) > 0 && alltrue([for c in var.api_allowed_cidrs : can(cidrnetmask(c))])
    error_message = "api_allowed_cidrs must list at least one IPv4 CIDR block."
  }
}

variable "api_rate_limit_per_5min" {
  description = "WAF rate limit: requests one client IP may send in 5 minutes before it is blocked (API keys are per tenant, so a single IP carries one tenant's traffic at most)."
  type        = number
  default     = 20000
  nullable    = false

  validation {
    condition     = var.api_rate_limit_per_5min >= 100 && var.api_rate_limit_per_5min <= 2000000000
    error_message = "api_rate_limit_per_5min must be from 100 to 2000000000 (the range of a WAF rate-based rule)."
  }
}

################################################################################
# Workload identities (IRSA)
################################################################################

variable "kubernetes_namespace" {
  description = "Namespace the Helm release runs in: the IRSA roles trust only its service accounts."
  type        = string
  default     = "firstmile"
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", var.kubernetes_namespace))
    error_message = "kubernetes_namespace must be a Kubernetes namespace name (RFC 1123 label)."
  }
}

variable "service_accounts" {
  description = "Kubernetes service account of each workload, as the chart names them. Each gets its own IAM role (IRSA) with only what that workload does."
  type = object({
    api         = optional(string, "firstmile-api")
    relay       = optional(string, "firstmile-relay")
    consumers   = optional(string, "firstmile-consumers")
    scheduler   = optional(string, "firstmile-scheduler")
    inference   = optional(string, "firstmile-inference")
    migrations  = optional(string, "firstmile-migrations")
    lb_bindings = optional(string, "aws-load-balancer-controller")
  })
  default  = {}
  nullable = false

  validation {
    condition     = alltrue([for sa in values(var.service_accounts) : can(regex("^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", sa))])
    error_message = "service_accounts must be Kubernetes service account names (RFC 1123 subdomains)."
  }
}

variable "lb_controller_namespace" {
  description = "Namespace of the AWS Load Balancer Controller, which registers the API pods in the API target group (TargetGroupBinding)."
  type        = string
  default     = "kube-system"
  nullable    = false
}

variable "database_users" {
  description = "PostgreSQL roles the workloads log in as, for IAM database authentication (rds-db:connect). app is FIRSTMILE_DATABASE_APP_ROLE; relay the login role granted firstmile_relay; directory the directory's application role."
  type = object({
    app       = optional(string, "firstmile_app")
    relay     = optional(string, "firstmile_relay_login")
    directory = optional(string, "firstmile_directory_app")
  })
  default  = {}
  nullable = false

  validation {
    condition     = alltrue([for u in values(var.database_users) : can(regex("^[a-z_][a-z0-9_]{0,62}$", u))])
    error_message = "database_users must be PostgreSQL role names: lower-case letters, digits and underscores, not starting with a digit."
  }
}
