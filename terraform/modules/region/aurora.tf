################################################################################
# Aurora PostgreSQL: the region's database (tenants homed here, their events, audit log,
# outbox). Private, encrypted with the aurora key, TLS enforced, IAM authentication on,
# deletion protection on, a final snapshot on destroy.
################################################################################

locals {
  aurora_identifier = local.name
  aurora_family     = "aurora-postgresql${split(".", var.aurora.engine_version)[0]}"
}

resource "aws_db_subnet_group" "this" {
  name       = local.name
  subnet_ids = [for s in aws_subnet.database : s.id]
  tags       = local.tags
}

resource "aws_security_group" "aurora" {
  name        = "${local.name}-aurora"
  description = "Aurora PostgreSQL of ${local.name}: 5432 from the EKS cluster only"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.name}-aurora" })
}

# Both of the region's clusters (its own and the directory member) accept the pods, nothing else.
resource "aws_vpc_security_group_ingress_rule" "aurora_from_eks" {
  security_group_id            = aws_security_group.aurora.id
  description                  = "PostgreSQL from the EKS nodes and pods"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

# One group per engine family, shared by the region's cluster and the directory member when
# they run the same major version.
resource "aws_rds_cluster_parameter_group" "this" {
  for_each = toset([local.aurora_family, local.directory_family])

  name        = "${local.name}-${each.key}"
  family      = each.key
  description = "${local.name}: TLS only, connection, DDL and slow statement logging"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  parameter {
    name  = "log_connections"
    value = "1"
  }

  parameter {
    name  = "log_disconnections"
    value = "1"
  }

  # Schema changes are logged (an audit trail of migrations and hand-made DDL); data statements
  # are not, since their parameters carry personal data. Statements slower than a second are.
  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }

  tags = local.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name               = "${local.global_name}-rds-monitoring"
  assume_role_policy = local.service_trust["monitoring.rds"]
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_rds_cluster" "this" {
  cluster_identifier = local.aurora_identifier
  engine             = "aurora-postgresql"
  engine_version     = var.aurora.engine_version
  database_name      = var.aurora.database_name
  master_username    = var.aurora.master_username

  # RDS generates the master password, keeps it in Secrets Manager under the secrets key and
  # rotates it; Terraform never sees it.
  manage_master_user_password   = true
  master_user_secret_kms_key_id = aws_kms_key.this["secrets"].arn

  db_subnet_group_name            = aws_db_subnet_group.this.name
  vpc_security_group_ids          = [aws_security_group.aurora.id]
  db_cluster_parameter_group_name = aws_rds_cluster_parameter_group.this[local.aurora_family].name
  port                            = 5432
  network_type                    = "IPV4"

  storage_encrypted                   = true
  kms_key_id                          = aws_kms_key.this["aurora"].arn
  iam_database_authentication_enabled = true
  deletion_protection                 = true

  backup_retention_period      = var.aurora.backup_retention_days
  preferred_backup_window      = var.aurora.preferred_backup_window
  preferred_maintenance_window = var.aurora.preferred_maintenance_window
  copy_tags_to_snapshot        = true
  skip_final_snapshot          = false
  final_snapshot_identifier    = "${local.aurora_identifier}-final"

  enabled_cloudwatch_logs_exports = ["postgresql"]

  tags = local.tags

  depends_on = [aws_cloudwatch_log_group.this]
}

resource "aws_rds_cluster_instance" "this" {
  count = var.aurora.instance_count

  identifier         = "${local.aurora_identifier}-${count.index + 1}"
  cluster_identifier = aws_rds_cluster.this.id
  engine             = aws_rds_cluster.this.engine
  engine_version     = aws_rds_cluster.this.engine_version
  instance_class     = var.aurora.instance_class
  # Spread the writer and readers over the zones; a failover lands in another zone.
  availability_zone = local.azs[count.index % length(local.azs)]

  db_subnet_group_name       = aws_db_subnet_group.this.name
  publicly_accessible        = false
  auto_minor_version_upgrade = true
  copy_tags_to_snapshot      = true

  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.this["aurora"].arn
  performance_insights_retention_period = var.aurora.performance_insights_retention_days

  monitoring_interval = var.aurora.monitoring_interval_seconds
  monitoring_role_arn = aws_iam_role.rds_monitoring.arn

  tags = local.tags

  depends_on = [aws_iam_role_policy_attachment.rds_monitoring]
}
