################################################################################
# Network
################################################################################

output "vpc_id" {
  description = "ID of the region's VPC."
  value       = aws_vpc.this.id
}

output "availability_zones" {
  description = "The three availability zones the region spreads over."
  value       = local.azs
}

output "subnet_ids" {
  description = "Subnet IDs by tier (public, private, database), each a map of availability zone to subnet ID."
  value = {
    public   = { for az, s in aws_subnet.public : az => s.id }
    private  = { for az, s in aws_subnet.private : az => s.id }
    database = { for az, s in aws_subnet.database : az => s.id }
  }
}

################################################################################
# EKS
################################################################################

output "cluster_name" {
  description = "Name of the EKS cluster (aws eks update-kubeconfig --name <this>)."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "Endpoint of the EKS API server (private unless eks.endpoint_public_access)."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA certificate of the EKS API server."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "cluster_security_group_id" {
  description = "Security group EKS gives the control plane, nodes and pods; the data stores admit only it."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

output "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider (IRSA)."
  value       = aws_iam_openid_connect_provider.eks.arn
}

output "gpu_node_selector" {
  description = "Labels of the GPU nodes: the chart's inference.gpu.nodeSelector."
  value       = local.gpu_node_labels
}

output "gpu_node_taint" {
  description = "Taint of the GPU nodes (Kubernetes spelling): the chart's inference.gpu.tolerations must tolerate it."
  value = {
    key    = local.gpu_node_taint.key
    value  = local.gpu_node_taint.value
    effect = "NoSchedule"
  }
}

output "workload_role_arns" {
  description = "IRSA role ARN of each workload (api, relay, consumers, scheduler, inference, migrations, lb_bindings): the eks.amazonaws.com/role-arn annotation of its service account."
  value       = { for w, r in aws_iam_role.workload : w => r.arn }
}

################################################################################
# Data stores
################################################################################

output "aurora_cluster_endpoint" {
  description = "Writer endpoint of the region's Aurora cluster (FIRSTMILE_DATABASE_URL's host)."
  value       = aws_rds_cluster.this.endpoint
}

output "aurora_reader_endpoint" {
  description = "Reader endpoint of the region's Aurora cluster."
  value       = aws_rds_cluster.this.reader_endpoint
}

output "aurora_master_user_secret_arn" {
  description = "Secrets Manager secret holding the region database's master user (managed and rotated by RDS)."
  value       = aws_rds_cluster.this.master_user_secret[0].secret_arn
}

output "directory_endpoint" {
  description = "Endpoint of this region's member of the tenant directory (FIRSTMILE_DIRECTORY_URL's host): the writer in the primary region, a reader that forwards writes elsewhere."
  value       = one(concat(aws_rds_cluster.directory_primary[*].endpoint, aws_rds_cluster.directory_secondary[*].endpoint))
}

output "directory_primary_cluster_arn" {
  description = "ARN of the directory's primary cluster when this region holds it, else null. Available once the primary's first instance exists, so that secondaries attach after it."
  value       = one(aws_rds_cluster.directory_primary[*].arn)
  depends_on  = [aws_rds_cluster_instance.directory_primary]
}

output "directory_master_secret_arn" {
  description = "Secrets Manager secret holding the directory's master user (primary region only, else null)."
  value       = one(aws_secretsmanager_secret.directory_master[*].arn)
}

output "msk_bootstrap_brokers_sasl_scram" {
  description = "Bootstrap brokers for SASL/SCRAM over TLS, port 9096 (FIRSTMILE_KAFKA_BOOTSTRAP_SERVERS of the platform)."
  value       = aws_msk_cluster.this.bootstrap_brokers_sasl_scram
}

output "msk_scram_secret_arn" {
  description = "Secrets Manager secret holding the platform's SASL/SCRAM user, JSON {\"username\", \"password\"} (FIRSTMILE_KAFKA_SASL_USERNAME, FIRSTMILE_KAFKA_SASL_PASSWORD)."
  value       = aws_secretsmanager_secret.msk_scram.arn
}

output "msk_bootstrap_brokers_sasl_iam" {
  description = "Bootstrap brokers for SASL/IAM over TLS, port 9098 (operators' tools)."
  value       = aws_msk_cluster.this.bootstrap_brokers_sasl_iam
}

output "msk_cluster_arn" {
  description = "ARN of the MSK cluster."
  value       = aws_msk_cluster.this.arn
}

output "redis_primary_endpoint" {
  description = "Primary endpoint of the Redis replication group (FIRSTMILE_REDIS_URL=rediss://:<token>@<this>:6379/0)."
  value       = aws_elasticache_replication_group.this.primary_endpoint_address
}

output "redis_auth_secret_arn" {
  description = "Secrets Manager secret holding the Redis AUTH token."
  value       = aws_secretsmanager_secret.redis_auth.arn
}

output "audit_bucket" {
  description = "Name of the audit bucket (Object Lock, COMPLIANCE mode)."
  value       = aws_s3_bucket.audit.id
}

output "logs_bucket" {
  description = "Name of the bucket receiving ALB and S3 server access logs."
  value       = aws_s3_bucket.logs.id
}

output "efs_file_system_id" {
  description = "EFS file system of the model registry volume: the fileSystemId of the StorageClass (provisioningMode efs-ap) named in the chart's models.persistence.storageClassName."
  value       = aws_efs_file_system.models.id
}

output "kms_key_arns" {
  description = "ARN of each customer-managed key, by purpose."
  value       = { for p, k in aws_kms_key.this : p => k.arn }
}

################################################################################
# API endpoint
################################################################################

output "api_target_group_arn" {
  description = "Target group of the API pods: the chart's TargetGroupBinding points at it."
  value       = aws_lb_target_group.api.arn
}

output "api_urls" {
  description = "The shared, latency-routed URL of the API and this region's own (FIRSTMILE_PUBLIC_URL)."
  value = {
    shared = "https://${local.api_shared_fqdn}"
    region = "https://${local.api_region_fqdn}"
  }
}
