# Plans the region module against a mocked AWS provider (no credentials, no network) and checks
# the guarantees the platform relies on: encryption at rest everywhere, no public data store,
# Object Lock in COMPLIANCE mode, deletion protection, least-privilege workload roles.
#
# override_during = plan makes the mocked computed values (ARNs, IDs) known at plan time, so
# the assertions compare real references: a key ARN below is the ARN of that very key.

mock_provider "aws" {
  override_during = plan
  source          = "../../tests/mocks/aws"
}

# Distinct values where a test compares references: each key, subnet and the cluster's
# security group gets its own, so "encrypted with the aurora key" cannot pass by accident.
override_resource {
  override_during = plan
  target          = aws_kms_key.this["eks"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/eks" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["ebs"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/ebs" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["aurora"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/aurora" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["msk"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/msk" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["msk_scram"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/msk_scram" }
}

override_resource {
  override_during = plan
  target          = aws_secretsmanager_secret.msk_scram
  values          = { arn = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:AmazonMSK_firstmile-production_firstmile-mock" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["efs"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/efs" }
}

override_resource {
  override_during = plan
  target          = aws_efs_file_system.models
  values = {
    id  = "fs-models"
    arn = "arn:aws:elasticfilesystem:eu-west-1:111122223333:file-system/fs-models"
  }
}

override_resource {
  override_during = plan
  target          = aws_security_group.efs
  values          = { id = "sg-efs" }
}

override_resource {
  override_during = plan
  target          = aws_backup_plan.this
  values          = { id = "backup-plan-mock" }
}

override_resource {
  override_during = plan
  target          = aws_iam_role.efs_csi
  values          = { arn = "arn:aws:iam::111122223333:role/firstmile-production-eu-west-1-efs-csi" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["elasticache"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/elasticache" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["s3"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/s3" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["logs"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/logs" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["backup"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/backup" }
}

override_resource {
  override_during = plan
  target          = aws_kms_key.this["secrets"]
  values          = { arn = "arn:aws:kms:eu-west-1:111122223333:key/secrets" }
}

override_resource {
  override_during = plan
  target          = aws_subnet.private["eu-west-1a"]
  values          = { id = "subnet-private-a" }
}

override_resource {
  override_during = plan
  target          = aws_subnet.private["eu-west-1b"]
  values          = { id = "subnet-private-b" }
}

override_resource {
  override_during = plan
  target          = aws_subnet.private["eu-west-1c"]
  values          = { id = "subnet-private-c" }
}

override_resource {
  override_during = plan
  target          = aws_subnet.database["eu-west-1a"]
  values          = { id = "subnet-database-a" }
}

override_resource {
  override_during = plan
  target          = aws_subnet.database["eu-west-1b"]
  values          = { id = "subnet-database-b" }
}

override_resource {
  override_during = plan
  target          = aws_subnet.database["eu-west-1c"]
  values          = { id = "subnet-database-c" }
}

override_resource {
  override_during = plan
  target          = aws_rds_cluster.this
  values = {
    arn                = "arn:aws:rds:eu-west-1:111122223333:cluster:firstmile-production"
    master_user_secret = [{ secret_arn = "arn:aws:secretsmanager:eu-west-1:111122223333:secret:rds!cluster-mock", kms_key_id = "", secret_status = "active" }]
  }
}

override_resource {
  override_during = plan
  target          = aws_eks_cluster.this
  values = {
    identity              = [{ oidc = [{ issuer = "https://oidc.eks.eu-west-1.amazonaws.com/id/MOCK" }] }]
    certificate_authority = [{ data = "bW9jaw==" }]
    vpc_config            = { cluster_security_group_id = "sg-eks-cluster" }
  }
}

variables {
  environment = "production"
  vpc_cidr    = "10.20.0.0/16"
  directory = {
    global_cluster_identifier = "firstmile-production-directory"
    role                      = "primary"
    engine_version            = "16.6"
    database_name             = "firstmile_directory"
  }
  dns = {
    zone_id                = "Z0MOCKZONE"
    domain_name            = "firstmile.example.com"
    owns_shared_validation = true
  }
}

run "primary_region" {
  command = plan

  # --- encryption at rest -----------------------------------------------------------------

  assert {
    condition     = alltrue([for k in aws_kms_key.this : k.enable_key_rotation])
    error_message = "Every customer-managed key must rotate."
  }

  assert {
    condition = (
      aws_rds_cluster.this.storage_encrypted &&
      aws_rds_cluster.this.kms_key_id == aws_kms_key.this["aurora"].arn &&
      aws_rds_cluster.directory_primary[0].storage_encrypted &&
      aws_rds_cluster.directory_primary[0].kms_key_id == aws_kms_key.this["aurora"].arn
    )
    error_message = "Both Aurora clusters must be encrypted with the region's aurora key."
  }

  assert {
    condition = alltrue([
      for i in concat(aws_rds_cluster_instance.this, aws_rds_cluster_instance.directory_primary) :
      i.performance_insights_enabled && i.performance_insights_kms_key_id == aws_kms_key.this["aurora"].arn
    ])
    error_message = "Performance Insights must be on and encrypted with the aurora key on every instance."
  }

  assert {
    condition = (
      aws_msk_cluster.this.encryption_info[0].encryption_at_rest_kms_key_arn == aws_kms_key.this["msk"].arn &&
      aws_msk_cluster.this.encryption_info[0].encryption_in_transit[0].client_broker == "TLS" &&
      aws_msk_cluster.this.encryption_info[0].encryption_in_transit[0].in_cluster
    )
    error_message = "MSK must encrypt storage with the msk key and use TLS between clients and brokers and between brokers."
  }

  assert {
    condition = (
      tobool(aws_elasticache_replication_group.this.at_rest_encryption_enabled) &&
      aws_elasticache_replication_group.this.kms_key_id == aws_kms_key.this["elasticache"].arn &&
      aws_elasticache_replication_group.this.transit_encryption_enabled &&
      aws_elasticache_replication_group.this.transit_encryption_mode == "required"
    )
    error_message = "Redis must encrypt storage with the elasticache key and require TLS."
  }

  assert {
    condition = (
      one(aws_s3_bucket_server_side_encryption_configuration.audit.rule).apply_server_side_encryption_by_default[0].sse_algorithm == "aws:kms" &&
      one(aws_s3_bucket_server_side_encryption_configuration.audit.rule).apply_server_side_encryption_by_default[0].kms_master_key_id == aws_kms_key.this["s3"].arn &&
      one(aws_s3_bucket_server_side_encryption_configuration.logs.rule).apply_server_side_encryption_by_default[0].sse_algorithm == "AES256"
    )
    error_message = "The audit bucket must use SSE-KMS with the s3 key; the log bucket SSE-S3 (all ALB and S3 log delivery accepts)."
  }

  assert {
    condition = (
      contains(aws_eks_cluster.this.encryption_config[0].resources, "secrets") &&
      aws_eks_cluster.this.encryption_config[0].provider[0].key_arn == aws_kms_key.this["eks"].arn
    )
    error_message = "EKS must envelope-encrypt Kubernetes secrets with the eks key."
  }

  assert {
    condition = length(aws_cloudwatch_log_group.this) == 7 && alltrue([
      for lg in aws_cloudwatch_log_group.this : lg.kms_key_id == aws_kms_key.this["logs"].arn && lg.retention_in_days == 365
    ])
    error_message = "Every log group must be encrypted with the logs key and keep a year."
  }

  assert {
    condition = (
      aws_eks_addon.vpc_cni.addon_name == "vpc-cni" &&
      jsondecode(aws_eks_addon.vpc_cni.configuration_values).enableNetworkPolicy == "true"
    )
    error_message = "The VPC CNI must enforce NetworkPolicies (enableNetworkPolicy), or the chart's policies are enforced by nothing."
  }

  assert {
    condition = alltrue([
      for lt in aws_launch_template.node : alltrue([
        for b in lt.block_device_mappings : b.ebs[0].encrypted == "true" && b.ebs[0].kms_key_id == aws_kms_key.this["ebs"].arn
      ])
    ])
    error_message = "Node volumes must be encrypted with the ebs key."
  }

  assert {
    condition = (
      aws_secretsmanager_secret.redis_auth.kms_key_id == aws_kms_key.this["secrets"].arn &&
      aws_secretsmanager_secret.directory_master[0].kms_key_id == aws_kms_key.this["secrets"].arn &&
      aws_rds_cluster.this.master_user_secret_kms_key_id == aws_kms_key.this["secrets"].arn
    )
    error_message = "Every secret must be encrypted with the secrets key."
  }

  assert {
    condition = (
      aws_backup_vault.this.kms_key_arn == aws_kms_key.this["backup"].arn &&
      contains(aws_backup_selection.databases.resources, aws_rds_cluster.this.arn) &&
      length(aws_backup_selection.databases.resources) == 2
    )
    error_message = "AWS Backup must copy the region's database and the directory's primary into a vault under the backup key."
  }

  assert {
    condition = (
      aws_elasticache_replication_group.this.multi_az_enabled &&
      aws_elasticache_replication_group.this.automatic_failover_enabled &&
      aws_elasticache_replication_group.this.num_cache_clusters == 3 &&
      length(toset(aws_elasticache_replication_group.this.preferred_cache_cluster_azs)) == 3
    )
    error_message = "Redis must keep a primary and two replicas in three zones, with automatic Multi-AZ failover."
  }

  # --- no public data stores --------------------------------------------------------------

  assert {
    condition     = alltrue([for i in concat(aws_rds_cluster_instance.this, aws_rds_cluster_instance.directory_primary) : i.publicly_accessible == false])
    error_message = "No Aurora instance may be publicly accessible."
  }

  assert {
    condition = (
      aws_db_subnet_group.this.subnet_ids == toset([for s in aws_subnet.database : s.id]) &&
      aws_elasticache_subnet_group.this.subnet_ids == toset([for s in aws_subnet.database : s.id]) &&
      aws_msk_cluster.this.broker_node_group_info[0].client_subnets == toset([for s in aws_subnet.database : s.id])
    )
    error_message = "Aurora, Redis and MSK must live in the database subnets only."
  }

  assert {
    condition     = length(aws_route_table.database.route) == 0 && alltrue([for s in aws_subnet.database : s.map_public_ip_on_launch != true])
    error_message = "The database subnets must have no route out of the VPC."
  }

  assert {
    condition = alltrue([
      for r in [
        aws_vpc_security_group_ingress_rule.aurora_from_eks, aws_vpc_security_group_ingress_rule.redis_from_eks,
        aws_vpc_security_group_ingress_rule.msk_from_eks, aws_vpc_security_group_ingress_rule.msk_scram_from_eks,
        aws_vpc_security_group_ingress_rule.msk_exporters_from_eks,
      ] : r.cidr_ipv4 == null && r.cidr_ipv6 == null && r.referenced_security_group_id == aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
    ])
    error_message = "The data stores must admit the EKS cluster's security group and no address range."
  }

  assert {
    condition = (
      aws_msk_cluster.this.broker_node_group_info[0].connectivity_info[0].public_access[0].type == "DISABLED" &&
      aws_msk_cluster.this.client_authentication[0].unauthenticated == false &&
      aws_msk_cluster.this.client_authentication[0].sasl[0].scram &&
      aws_msk_cluster.this.client_authentication[0].sasl[0].iam &&
      length(aws_msk_cluster.this.client_authentication[0].tls) == 0
    )
    error_message = "MSK must be private and accept SASL/SCRAM (the platform) and SASL/IAM (operators) clients only, none unauthenticated."
  }

  # --- the platform's Kafka user (SASL/SCRAM) -------------------------------------------------

  assert {
    condition = (
      startswith(aws_secretsmanager_secret.msk_scram.name, "AmazonMSK_") &&
      aws_secretsmanager_secret.msk_scram.kms_key_id == aws_kms_key.this["msk_scram"].arn &&
      aws_secretsmanager_secret.msk_scram.kms_key_id != aws_kms_key.this["secrets"].arn
    )
    error_message = "MSK reads SCRAM users only from secrets named AmazonMSK_* under a customer-managed key: the msk_scram key of this module."
  }

  assert {
    condition = (
      aws_msk_scram_secret_association.this.cluster_arn == aws_msk_cluster.this.arn &&
      aws_msk_scram_secret_association.this.secret_arn_list == toset([aws_secretsmanager_secret.msk_scram.arn])
    )
    error_message = "The SCRAM secret, and only it, must be associated with the region's MSK cluster."
  }

  assert {
    condition = (
      aws_secretsmanager_secret_version.msk_scram.secret_string_wo_version == 1 &&
      aws_secretsmanager_secret_policy.msk_scram.secret_arn == aws_secretsmanager_secret.msk_scram.arn &&
      length(jsondecode(aws_secretsmanager_secret_policy.msk_scram.policy).Statement) == 1 &&
      jsondecode(aws_secretsmanager_secret_policy.msk_scram.policy).Statement[0].Principal == { Service = "kafka.amazonaws.com" } &&
      lower(jsondecode(aws_secretsmanager_secret_policy.msk_scram.policy).Statement[0].Action) == "secretsmanager:getsecretvalue" &&
      jsondecode(aws_secretsmanager_secret_policy.msk_scram.policy).Statement[0].Resource == aws_secretsmanager_secret.msk_scram.arn
    )
    error_message = "The SCRAM secret's policy must let the Kafka service read that secret and grant nothing else."
  }

  assert {
    condition     = output.msk_scram_secret_arn == aws_secretsmanager_secret.msk_scram.arn && output.msk_bootstrap_brokers_sasl_scram == aws_msk_cluster.this.bootstrap_brokers_sasl_scram
    error_message = "The outputs must give the chart the SCRAM brokers and the secret of the SCRAM user."
  }

  assert {
    condition = alltrue([
      for b in aws_s3_bucket_public_access_block.this :
      b.block_public_acls && b.block_public_policy && b.ignore_public_acls && b.restrict_public_buckets
    ])
    error_message = "Both buckets must block every form of public access."
  }

  assert {
    condition     = alltrue([for o in aws_s3_bucket_ownership_controls.this : o.rule[0].object_ownership == "BucketOwnerEnforced"])
    error_message = "Both buckets must have ACLs disabled."
  }

  assert {
    condition = alltrue([
      for p in [aws_s3_bucket_policy.audit.policy, aws_s3_bucket_policy.logs.policy] : anytrue([
        for s in jsondecode(p).Statement :
        s.Effect == "Deny" && s.Principal == "*" && s.Action == "s3:*" && try(s.Condition.Bool["aws:SecureTransport"], "") == "false"
      ])
    ])
    error_message = "Both buckets must refuse requests without TLS."
  }

  assert {
    condition = alltrue([
      for p in [aws_s3_bucket_policy.audit.policy, aws_s3_bucket_policy.logs.policy] : anytrue([
        for s in jsondecode(p).Statement :
        s.Effect == "Deny" && s.Principal == "*" && try(s.Condition.NumericLessThan["s3:TlsVersion"], "") == "1.2"
      ])
    ])
    error_message = "Both buckets must refuse TLS below 1.2."
  }

  assert {
    condition     = length(aws_default_security_group.this.ingress) == 0 && length(aws_default_security_group.this.egress) == 0
    error_message = "The VPC's default security group must allow nothing."
  }

  assert {
    condition     = strcontains(aws_msk_configuration.this.server_properties, "min.insync.replicas=2") && strcontains(aws_msk_configuration.this.server_properties, "auto.create.topics.enable=false")
    error_message = "Kafka must acknowledge writes in two zones and create no topic implicitly."
  }

  assert {
    condition     = aws_eks_cluster.this.vpc_config[0].endpoint_public_access == false && aws_eks_cluster.this.vpc_config[0].endpoint_private_access
    error_message = "The EKS API endpoint must be private by default."
  }

  # --- the models volume (EFS) ---------------------------------------------------------------

  assert {
    condition = (
      aws_efs_file_system.models.encrypted &&
      aws_efs_file_system.models.kms_key_id == aws_kms_key.this["efs"].arn
    )
    error_message = "The models file system must be encrypted with the region's efs key."
  }

  assert {
    condition = (
      length(aws_efs_mount_target.models) == 3 &&
      toset([for m in aws_efs_mount_target.models : m.subnet_id]) == toset([for s in aws_subnet.private : s.id]) &&
      alltrue([for m in aws_efs_mount_target.models : m.security_groups == toset([aws_security_group.efs.id])])
    )
    error_message = "The models file system must be reachable only through one mount target in each private subnet, behind its own security group."
  }

  assert {
    condition = (
      aws_vpc_security_group_ingress_rule.efs_from_eks.security_group_id == aws_security_group.efs.id &&
      aws_vpc_security_group_ingress_rule.efs_from_eks.ip_protocol == "tcp" &&
      aws_vpc_security_group_ingress_rule.efs_from_eks.from_port == 2049 &&
      aws_vpc_security_group_ingress_rule.efs_from_eks.to_port == 2049 &&
      aws_vpc_security_group_ingress_rule.efs_from_eks.referenced_security_group_id == aws_eks_cluster.this.vpc_config[0].cluster_security_group_id &&
      aws_vpc_security_group_ingress_rule.efs_from_eks.cidr_ipv4 == null &&
      aws_vpc_security_group_ingress_rule.efs_from_eks.cidr_ipv6 == null &&
      aws_vpc_security_group_ingress_rule.efs_from_eks.prefix_list_id == null
    )
    error_message = "The models file system's security group must admit NFS (2049) from the EKS cluster's security group and nothing else."
  }

  assert {
    condition = (
      anytrue([
        for st in jsondecode(aws_efs_file_system_policy.models.policy).Statement :
        st.Effect == "Deny" && st.Action == "*" && try(st.Condition.Bool["aws:SecureTransport"], "") == "false"
      ]) &&
      alltrue([
        for st in jsondecode(aws_efs_file_system_policy.models.policy).Statement :
        st.Effect == "Deny" || (
          try(st.Condition.Bool["elasticfilesystem:AccessedViaMountTarget"], "") == "true" &&
          !contains(flatten([st.Action]), "elasticfilesystem:ClientRootAccess")
        )
      ])
    )
    error_message = "The models file system must refuse clients without TLS and allow others only through a mount target, never as root."
  }

  assert {
    condition     = aws_backup_selection.models.resources == toset([aws_efs_file_system.models.arn]) && aws_backup_selection.models.plan_id == aws_backup_plan.this.id
    error_message = "AWS Backup must copy the models file system daily into the region's vault."
  }

  assert {
    condition = (
      aws_eks_addon.efs_csi.addon_name == "aws-efs-csi-driver" &&
      aws_eks_addon.efs_csi.service_account_role_arn == aws_iam_role.efs_csi.arn &&
      aws_iam_role_policy_attachment.efs_csi.role == aws_iam_role.efs_csi.name &&
      aws_iam_role_policy_attachment.efs_csi.policy_arn == "arn:aws:iam::aws:policy/service-role/AmazonEFSCSIDriverPolicy"
    )
    error_message = "The EFS CSI driver add-on must run with its own IRSA role holding AmazonEFSCSIDriverPolicy."
  }

  assert {
    condition = (
      jsondecode(aws_iam_role.efs_csi.assume_role_policy).Statement[0].Condition.StringEquals["oidc.eks.eu-west-1.amazonaws.com/id/MOCK:sub"] == [
        "system:serviceaccount:kube-system:efs-csi-controller-sa",
        "system:serviceaccount:kube-system:efs-csi-node-sa",
      ] &&
      length(jsondecode(aws_iam_role.efs_csi.assume_role_policy).Statement) == 1
    )
    error_message = "The EFS CSI driver's role must trust exactly the driver's two service accounts in kube-system."
  }

  assert {
    condition     = output.efs_file_system_id == aws_efs_file_system.models.id
    error_message = "The outputs must give the models StorageClass its file system."
  }

  # --- Object Lock --------------------------------------------------------------------------

  assert {
    condition = (
      aws_s3_bucket.audit.object_lock_enabled &&
      aws_s3_bucket_object_lock_configuration.audit.rule[0].default_retention[0].mode == "COMPLIANCE" &&
      aws_s3_bucket_object_lock_configuration.audit.rule[0].default_retention[0].days == 2557 &&
      aws_s3_bucket_versioning.this["audit"].versioning_configuration[0].status == "Enabled"
    )
    error_message = "The audit bucket must be versioned and locked in COMPLIANCE mode for the configured retention."
  }

  # --- deletion protection and Aurora hardening ---------------------------------------------

  assert {
    condition = alltrue([
      for c in [aws_rds_cluster.this, aws_rds_cluster.directory_primary[0]] :
      c.deletion_protection && !c.skip_final_snapshot && c.iam_database_authentication_enabled && c.backup_retention_period >= 7
    ])
    error_message = "Aurora clusters need deletion protection, a final snapshot, IAM authentication and backups."
  }

  assert {
    condition     = aws_rds_cluster.this.manage_master_user_password && aws_rds_cluster.this.master_password == null
    error_message = "The region database's master password must be managed by RDS, never given by Terraform."
  }

  assert {
    condition     = length(aws_rds_cluster_instance.this) == 2 && length(toset([for i in aws_rds_cluster_instance.this : i.availability_zone])) == 2
    error_message = "The writer and its reader must be in different zones."
  }

  assert {
    condition = alltrue([
      for g in aws_rds_cluster_parameter_group.this :
      anytrue([for p in g.parameter : p.name == "rds.force_ssl" && p.value == "1"]) &&
      anytrue([for p in g.parameter : p.name == "log_statement" && p.value == "ddl"])
    ])
    error_message = "Both Aurora clusters must refuse connections without TLS and log schema changes."
  }

  # --- the directory's global database member ------------------------------------------------

  assert {
    condition = (
      aws_rds_cluster.directory_primary[0].global_cluster_identifier == "firstmile-production-directory" &&
      length(aws_rds_cluster.directory_secondary) == 0 &&
      aws_rds_cluster.directory_primary[0].master_password == null
    )
    error_message = "The primary region must hold the directory's primary member, with a write-only master password."
  }

  # --- network --------------------------------------------------------------------------------

  assert {
    condition     = length(aws_nat_gateway.this) == 3 && length(toset([for s in aws_subnet.private : s.availability_zone])) == 3
    error_message = "Three zones, each with its own NAT gateway."
  }

  assert {
    condition     = aws_flow_log.this.traffic_type == "ALL" && aws_flow_log.this.log_destination == aws_cloudwatch_log_group.this["flow_logs"].arn
    error_message = "VPC flow logs must record all traffic to the encrypted log group."
  }

  # --- EKS ----------------------------------------------------------------------------------

  assert {
    condition     = length(setsubtract(["api", "audit", "authenticator", "controllerManager", "scheduler"], aws_eks_cluster.this.enabled_cluster_log_types)) == 0
    error_message = "Every control-plane log type must be enabled."
  }

  assert {
    condition = (
      aws_eks_node_group.this["gpu"].ami_type == "AL2023_x86_64_NVIDIA" &&
      aws_eks_node_group.this["gpu"].labels["nvidia.com/gpu.present"] == "true" &&
      aws_eks_node_group.this["gpu"].labels["firstmile.io/node-pool"] == "gpu" &&
      anytrue([for t in aws_eks_node_group.this["gpu"].taint : t.key == "nvidia.com/gpu" && t.effect == "NO_SCHEDULE"]) &&
      length(aws_eks_node_group.this["general"].taint) == 0
    )
    error_message = "The GPU group must carry the NVIDIA AMI, the nvidia.com/gpu taint and the labels the chart selects; the general group no taint."
  }

  assert {
    condition = alltrue([
      for lt in aws_launch_template.node :
      lt.metadata_options[0].http_tokens == "required" && lt.metadata_options[0].http_put_response_hop_limit == 1
    ])
    error_message = "Nodes must require IMDSv2 with a hop limit of 1, so pods cannot use the node's role."
  }

  # --- workload roles ---------------------------------------------------------------------------

  assert {
    condition = alltrue([
      for w, r in aws_iam_role.workload :
      jsondecode(r.assume_role_policy).Statement[0].Condition.StringEquals["oidc.eks.eu-west-1.amazonaws.com/id/MOCK:sub"] == (
        w == "lb_bindings" ? "system:serviceaccount:kube-system:aws-load-balancer-controller" : "system:serviceaccount:firstmile:${var.service_accounts[w]}"
      )
    ])
    error_message = "Each workload role must trust exactly its own service account."
  }

  assert {
    condition     = length(setsubtract(["api", "relay", "consumers", "scheduler", "inference", "migrations"], keys(aws_iam_role.workload))) == 0
    error_message = "Every workload must have its own role."
  }

  assert {
    condition = alltrue(flatten([
      for p in aws_iam_role_policy.workload : [
        for s in jsondecode(p.policy).Statement : s.Action != "*" && !contains(flatten([s.Action]), "*") && (s.Resource != "*" || alltrue([for a in flatten([s.Action]) : can(regex(":Describe", a))]))
      ]
    ]))
    error_message = "Workload policies must name their actions, and use Resource \"*\" only for Describe calls."
  }

  assert {
    condition     = !contains(keys(aws_iam_role_policy.workload), "inference")
    error_message = "The inference workload needs no AWS permission."
  }

  assert {
    condition = alltrue([
      for s in jsondecode(aws_iam_role_policy.workload["relay"].policy).Statement :
      s.Resource == aws_msk_cluster.this.arn || startswith(s.Resource, "arn:aws:kafka:eu-west-1:111122223333:topic/firstmile-production/") || startswith(s.Resource, "arn:aws:rds-db:")
    ])
    error_message = "The relay may touch only the region's cluster, its topics and its database login."
  }

  # --- API endpoint -------------------------------------------------------------------------------

  assert {
    condition = (
      aws_route53_record.api_latency.name == "api.firstmile.example.com" &&
      aws_route53_record.api_latency.latency_routing_policy[0].region == "eu-west-1" &&
      aws_route53_record.api_latency.set_identifier == "eu-west-1" &&
      aws_route53_record.api_latency.alias[0].evaluate_target_health
    )
    error_message = "api.<domain> must be a latency record of this region that follows the load balancer's health."
  }

  assert {
    condition     = length(aws_route53_record.api_validation) == 2
    error_message = "The region owning the shared name validates both names of its certificate."
  }

  assert {
    condition = (
      aws_lb_listener.https.protocol == "HTTPS" && startswith(aws_lb_listener.https.ssl_policy, "ELBSecurityPolicy-TLS13") &&
      aws_lb.api.drop_invalid_header_fields && aws_lb.api.access_logs[0].enabled &&
      aws_wafv2_web_acl_association.api.resource_arn == aws_lb.api.arn
    )
    error_message = "The API load balancer must serve TLS 1.2+ only, drop invalid headers, log access and sit behind WAF."
  }

  assert {
    condition     = output.gpu_node_taint.effect == "NoSchedule" && output.gpu_node_selector["firstmile.io/node-pool"] == "gpu"
    error_message = "The outputs must give the chart the GPU selector and taint in Kubernetes spelling."
  }
}

run "secondary_region" {
  command = plan

  variables {
    directory = {
      global_cluster_identifier = "firstmile-production-directory"
      role                      = "secondary"
      engine_version            = "16.6"
      database_name             = "firstmile_directory"
    }
    directory_primary_cluster_arn = "arn:aws:rds:eu-west-1:111122223333:cluster:firstmile-production-directory"
    dns = {
      zone_id                = "Z0MOCKZONE"
      domain_name            = "firstmile.example.com"
      owns_shared_validation = false
    }
  }

  assert {
    condition = (
      length(aws_rds_cluster.directory_primary) == 0 &&
      aws_rds_cluster.directory_secondary[0].enable_global_write_forwarding &&
      aws_rds_cluster.directory_secondary[0].storage_encrypted &&
      aws_rds_cluster.directory_secondary[0].kms_key_id == aws_kms_key.this["aurora"].arn &&
      aws_rds_cluster.directory_secondary[0].deletion_protection &&
      length(data.aws_secretsmanager_random_password.directory_master) == 0
    )
    error_message = "A secondary region must hold an encrypted, protected, write-forwarding secondary of the directory and no master user."
  }

  assert {
    condition = (
      length(aws_rds_cluster_instance.directory_primary) == 0 &&
      length(aws_rds_cluster_instance.directory_secondary) == 2 &&
      alltrue([for i in aws_rds_cluster_instance.directory_secondary : i.publicly_accessible == false && i.performance_insights_kms_key_id == aws_kms_key.this["aurora"].arn])
    )
    error_message = "The secondary member must have two private, encrypted instances of its own."
  }

  assert {
    condition     = aws_rds_cluster.directory_secondary[0].tags["firstmile:directory-primary"] == var.directory_primary_cluster_arn
    error_message = "The secondary must follow (and wait for) the primary it is given."
  }

  assert {
    condition     = length(aws_secretsmanager_secret.directory_master) == 0 && output.directory_primary_cluster_arn == null
    error_message = "Only the primary region keeps the directory's master secret and offers a primary ARN."
  }

  assert {
    condition     = keys(aws_route53_record.api_validation) == ["eu-west-1.api.firstmile.example.com"]
    error_message = "A region that does not own the shared name validates only its own name."
  }
}

run "public_endpoint_is_opt_in_and_narrow" {
  command = plan

  variables {
    eks = {
      endpoint_public_access = true
      public_access_cidrs    = ["203.0.113.0/24"]
    }
  }

  assert {
    condition = (
      aws_eks_cluster.this.vpc_config[0].endpoint_public_access &&
      aws_eks_cluster.this.vpc_config[0].public_access_cidrs == toset(["203.0.113.0/24"])
    )
    error_message = "A public EKS endpoint must be limited to the given ranges."
  }
}

################################################################################
# Bad input: each run gives one variable a value outside its validation and expects exactly
# that variable to fail (with the message it declares; tests/bad_input.py checks the text).
################################################################################

run "rejects_a_vpc_cidr_that_is_not_a_cidr" {
  command = plan
  variables {
    vpc_cidr = "10.20.0.0"
  }
  expect_failures = [var.vpc_cidr]
}

run "rejects_a_vpc_cidr_with_host_bits" {
  command = plan
  variables {
    vpc_cidr = "10.20.0.1/16"
  }
  expect_failures = [var.vpc_cidr]
}

run "rejects_a_vpc_too_small_for_three_zones" {
  command = plan
  variables {
    vpc_cidr = "10.20.0.0/24"
  }
  expect_failures = [var.vpc_cidr]
}

run "rejects_object_lock_retention_of_zero" {
  command = plan
  variables {
    audit_bucket = { object_lock_retention_days = 0 }
  }
  # fails with: object_lock_retention_days must be a whole number
  expect_failures = [var.audit_bucket]
}

run "rejects_a_single_aurora_instance" {
  command = plan
  variables {
    aurora = { instance_count = 1 }
  }
  # fails with: aurora.instance_count
  expect_failures = [var.aurora]
}

run "rejects_short_aurora_backups" {
  command = plan
  variables {
    aurora = { backup_retention_days = 1 }
  }
  # fails with: aurora.backup_retention_days
  expect_failures = [var.aurora]
}

run "rejects_a_scram_password_version_of_zero" {
  command = plan
  variables {
    msk = { scram_password_version = 0 }
  }
  # fails with: msk.scram_password_version
  expect_failures = [var.msk]
}

run "rejects_redis_without_replicas" {
  command = plan
  variables {
    redis = { replicas = 0 }
  }
  # fails with: redis.replicas
  expect_failures = [var.redis]
}

run "rejects_a_public_eks_endpoint_open_to_the_internet" {
  command = plan
  variables {
    eks = {
      endpoint_public_access = true
      public_access_cidrs    = ["0.0.0.0/0"]
    }
  }
  # fails with: eks.public_access_cidrs
  expect_failures = [var.eks]
}

run "rejects_an_unknown_directory_role" {
  command = plan
  variables {
    directory = {
      global_cluster_identifier = "firstmile-production-directory"
      role                      = "leader"
      engine_version            = "16.6"
      database_name             = "firstmile_directory"
    }
  }
  # fails with: directory.role
  expect_failures = [var.directory]
}

run "rejects_a_secondary_without_its_primary" {
  command = plan
  variables {
    directory = {
      global_cluster_identifier = "firstmile-production-directory"
      role                      = "secondary"
      engine_version            = "16.6"
      database_name             = "firstmile_directory"
    }
  }
  expect_failures = [var.directory_primary_cluster_arn]
}

run "rejects_a_log_retention_cloudwatch_does_not_offer" {
  command = plan
  variables {
    log_retention_days = 42
  }
  expect_failures = [var.log_retention_days]
}

run "rejects_a_domain_with_a_trailing_dot" {
  command = plan
  variables {
    dns = {
      zone_id                = "Z0MOCKZONE"
      domain_name            = "firstmile.example.com."
      owns_shared_validation = true
    }
  }
  # fails with: dns.domain_name
  expect_failures = [var.dns]
}
