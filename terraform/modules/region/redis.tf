################################################################################
# ElastiCache Redis: online features and admin sessions of the region. One shard, replicas in
# the other zones with automatic Multi-AZ failover, TLS required, storage and snapshots
# encrypted with the elasticache key, an AUTH token kept in Secrets Manager.
################################################################################

resource "aws_elasticache_subnet_group" "this" {
  name       = local.name
  subnet_ids = [for s in aws_subnet.database : s.id]
  tags       = local.tags
}

resource "aws_security_group" "redis" {
  name        = "${local.name}-redis"
  description = "Redis of ${local.name}: TLS on 6379 from the EKS cluster only"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.name}-redis" })
}

resource "aws_vpc_security_group_ingress_rule" "redis_from_eks" {
  security_group_id            = aws_security_group.redis.id
  description                  = "Redis over TLS from the EKS nodes and pods"
  ip_protocol                  = "tcp"
  from_port                    = 6379
  to_port                      = 6379
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

# The token is generated once per redis.auth_token_version and stored write-only in the secret,
# which is the one place it is read from: by this module for ElastiCache, by the platform for
# FIRSTMILE_REDIS_URL. ElastiCache's auth_token is not a write-only argument (provider 5.100),
# so the token is also in the Terraform state, which is why the state bucket is encrypted.
data "aws_secretsmanager_random_password" "redis_auth" {
  password_length     = 64
  exclude_punctuation = true
}

resource "aws_secretsmanager_secret" "redis_auth" {
  #checkov:skip=CKV2_AWS_57:Rotated by raising redis.auth_token_version: ElastiCache then takes the new token beside the old (auth_token_update_strategy ROTATE); Secrets Manager has no rotation function for ElastiCache AUTH tokens.
  name                    = "${local.name}/redis/auth-token"
  description             = "AUTH token of the ${local.name} Redis replication group"
  kms_key_id              = aws_kms_key.this["secrets"].arn
  recovery_window_in_days = 30
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id                = aws_secretsmanager_secret.redis_auth.id
  secret_string_wo         = data.aws_secretsmanager_random_password.redis_auth.random_password
  secret_string_wo_version = var.redis.auth_token_version
}

data "aws_secretsmanager_secret_version" "redis_auth" {
  secret_id  = aws_secretsmanager_secret.redis_auth.id
  version_id = aws_secretsmanager_secret_version.redis_auth.version_id
}

resource "aws_elasticache_replication_group" "this" {
  replication_group_id = local.name
  description          = "${local.name}: online features and admin sessions"
  engine               = "redis"
  engine_version       = var.redis.engine_version
  node_type            = var.redis.node_type
  port                 = 6379

  # Cluster mode off: the platform's client and Lua scripts expect a single keyspace. The
  # primary and its replicas spread over the zones.
  num_cache_clusters          = var.redis.replicas + 1
  preferred_cache_cluster_azs = [for i in range(var.redis.replicas + 1) : local.azs[i % length(local.azs)]]

  automatic_failover_enabled = true
  multi_az_enabled           = true

  subnet_group_name  = aws_elasticache_subnet_group.this.name
  security_group_ids = [aws_security_group.redis.id]

  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.this["elasticache"].arn
  transit_encryption_enabled = true
  transit_encryption_mode    = "required"
  auth_token                 = data.aws_secretsmanager_secret_version.redis_auth.secret_string
  # A new token is added beside the old one; clients move to it as they reconnect.
  auth_token_update_strategy = "ROTATE"

  snapshot_retention_limit   = var.redis.snapshot_retention_days
  snapshot_window            = "03:00-04:00"
  maintenance_window         = "sun:05:00-sun:06:00"
  auto_minor_version_upgrade = true
  apply_immediately          = false

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.this["redis"].name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "slow-log"
  }

  log_delivery_configuration {
    destination      = aws_cloudwatch_log_group.this["redis"].name
    destination_type = "cloudwatch-logs"
    log_format       = "json"
    log_type         = "engine-log"
  }

  tags = local.tags
}
