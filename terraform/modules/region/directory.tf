################################################################################
# The tenant directory's member in this region (FIRSTMILE_DIRECTORY_URL).
#
# The directory is the only data every region shares: slug -> (tenant id, home region). It is
# an Aurora global database (made by the global module): the primary region holds the writer,
# each other region a secondary that serves reads locally and forwards writes to the primary,
# so `firstmile tenants apply` registers tenants from any region. Serverless v2 keeps an idle
# member cheap (0.5 ACU), since the directory is read only on a cache miss.
################################################################################

locals {
  directory_is_primary = var.directory.role == "primary"
  directory_identifier = "${local.name}-directory"
  directory_family     = "aurora-postgresql${split(".", var.directory.engine_version)[0]}"

  # Two Serverless v2 instances per member: a failover target in another zone.
  directory_instance_count = 2
  directory_instance = {
    engine                          = "aurora-postgresql"
    engine_version                  = var.directory.engine_version
    instance_class                  = "db.serverless"
    db_subnet_group_name            = aws_db_subnet_group.this.name
    publicly_accessible             = false
    auto_minor_version_upgrade      = false # the global database's members upgrade together
    performance_insights_kms_key_id = aws_kms_key.this["aurora"].arn
    monitoring_interval             = var.aurora.monitoring_interval_seconds
    monitoring_role_arn             = aws_iam_role.rds_monitoring.arn
  }
}

# RDS cannot manage the master password of a global database member in Secrets Manager, so
# the module generates one and sends it, write-only, to RDS and to the secret, both only when
# master_password_version changes. The generator is a data source, so the password used is in
# the state until the next apply stores a fresh, unused one: Terraform 1.11's test mocks cannot
# run the ephemeral aws_secretsmanager_random_password, which would keep it out entirely.
data "aws_secretsmanager_random_password" "directory_master" {
  count = local.directory_is_primary ? 1 : 0

  password_length     = 40
  exclude_punctuation = true
}

resource "aws_secretsmanager_secret" "directory_master" {
  #checkov:skip=CKV2_AWS_57:Rotated by raising directory.master_password_version (a new password written to RDS and this secret in one apply); a rotation Lambda in the VPC is not worth it for a password only operators use.
  count = local.directory_is_primary ? 1 : 0

  name                    = "${local.name}/directory/master"
  description             = "Master user of the tenant directory's Aurora global database (${var.directory.global_cluster_identifier})"
  kms_key_id              = aws_kms_key.this["secrets"].arn
  recovery_window_in_days = 30
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "directory_master" {
  count = local.directory_is_primary ? 1 : 0

  secret_id = aws_secretsmanager_secret.directory_master[0].id
  secret_string_wo = jsonencode({
    username = var.directory.master_username
    password = data.aws_secretsmanager_random_password.directory_master[0].random_password
  })
  secret_string_wo_version = var.directory.master_password_version
}

# Two resources rather than one with conditional arguments: the secondary refers to the
# primary's ARN (an output of the primary region's module), and the primary must not, or the
# environment's graph would have a cycle.
resource "aws_rds_cluster" "directory_primary" {
  count = local.directory_is_primary ? 1 : 0

  cluster_identifier        = local.directory_identifier
  global_cluster_identifier = var.directory.global_cluster_identifier
  engine                    = "aurora-postgresql"
  engine_mode               = "provisioned"
  engine_version            = var.directory.engine_version
  database_name             = var.directory.database_name

  master_username            = var.directory.master_username
  master_password_wo         = data.aws_secretsmanager_random_password.directory_master[0].random_password
  master_password_wo_version = var.directory.master_password_version

  db_subnet_group_name            = aws_db_subnet_group.this.name
  vpc_security_group_ids          = [aws_security_group.aurora.id]
  db_cluster_parameter_group_name = aws_rds_cluster_parameter_group.this[local.directory_family].name

  storage_encrypted                   = true
  kms_key_id                          = aws_kms_key.this["aurora"].arn
  iam_database_authentication_enabled = true
  deletion_protection                 = true

  backup_retention_period   = var.aurora.backup_retention_days
  copy_tags_to_snapshot     = true
  skip_final_snapshot       = false
  final_snapshot_identifier = "${local.directory_identifier}-final"

  enabled_cloudwatch_logs_exports = ["postgresql"]

  serverlessv2_scaling_configuration {
    min_capacity = var.directory.min_capacity_acu
    max_capacity = var.directory.max_capacity_acu
  }

  tags = merge(local.tags, { "firstmile:directory-role" = "primary" })

  depends_on = [aws_cloudwatch_log_group.this]
}

resource "aws_rds_cluster" "directory_secondary" {
  #checkov:skip=CKV2_AWS_8:A secondary is a replica of the directory; AWS Backup copies the primary's cluster (backup.tf).
  count = local.directory_is_primary ? 0 : 1

  cluster_identifier        = local.directory_identifier
  global_cluster_identifier = var.directory.global_cluster_identifier
  engine                    = "aurora-postgresql"
  engine_mode               = "provisioned"
  engine_version            = var.directory.engine_version

  # Reads are served here; writes (tenants apply) are forwarded to the primary's writer.
  enable_global_write_forwarding = true

  db_subnet_group_name            = aws_db_subnet_group.this.name
  vpc_security_group_ids          = [aws_security_group.aurora.id]
  db_cluster_parameter_group_name = aws_rds_cluster_parameter_group.this[local.directory_family].name

  # A secondary of an encrypted global database must name a key of its own region.
  storage_encrypted                   = true
  kms_key_id                          = aws_kms_key.this["aurora"].arn
  iam_database_authentication_enabled = true
  deletion_protection                 = true

  backup_retention_period   = var.aurora.backup_retention_days
  copy_tags_to_snapshot     = true
  skip_final_snapshot       = false
  final_snapshot_identifier = "${local.directory_identifier}-final"

  enabled_cloudwatch_logs_exports = ["postgresql"]

  serverlessv2_scaling_configuration {
    min_capacity = var.directory.min_capacity_acu
    max_capacity = var.directory.max_capacity_acu
  }

  # The tag records which primary this member follows; referencing it orders this cluster
  # after the primary's writer.
  tags = merge(local.tags, {
    "firstmile:directory-role"    = "secondary"
    "firstmile:directory-primary" = var.directory_primary_cluster_arn
  })

  lifecycle {
    # AWS sets it on a global secondary; it is not ours to manage.
    ignore_changes = [replication_source_identifier]
  }

  depends_on = [aws_cloudwatch_log_group.this]
}

# Instances are split by role for the same reason as the clusters: the primary's instances are
# what directory_primary_cluster_arn waits for, so they must not depend on the secondary.
resource "aws_rds_cluster_instance" "directory_primary" {
  #checkov:skip=CKV_AWS_226:Members of a global database must run the same version: the directory is upgraded as a whole through the global cluster (aws rds modify-global-cluster), not by each instance on its own schedule.
  count = local.directory_is_primary ? local.directory_instance_count : 0

  identifier         = "${local.directory_identifier}-${count.index + 1}"
  cluster_identifier = aws_rds_cluster.directory_primary[0].id
  availability_zone  = local.azs[count.index % length(local.azs)]

  engine                     = local.directory_instance.engine
  engine_version             = local.directory_instance.engine_version
  instance_class             = local.directory_instance.instance_class
  db_subnet_group_name       = local.directory_instance.db_subnet_group_name
  publicly_accessible        = local.directory_instance.publicly_accessible
  auto_minor_version_upgrade = local.directory_instance.auto_minor_version_upgrade
  copy_tags_to_snapshot      = true

  performance_insights_enabled          = true
  performance_insights_kms_key_id       = local.directory_instance.performance_insights_kms_key_id
  performance_insights_retention_period = 7
  monitoring_interval                   = local.directory_instance.monitoring_interval
  monitoring_role_arn                   = local.directory_instance.monitoring_role_arn

  tags       = local.tags
  depends_on = [aws_iam_role_policy_attachment.rds_monitoring]
}

resource "aws_rds_cluster_instance" "directory_secondary" {
  #checkov:skip=CKV_AWS_226:Members of a global database must run the same version: the directory is upgraded as a whole through the global cluster (aws rds modify-global-cluster), not by each instance on its own schedule.
  count = local.directory_is_primary ? 0 : local.directory_instance_count

  identifier         = "${local.directory_identifier}-${count.index + 1}"
  cluster_identifier = aws_rds_cluster.directory_secondary[0].id
  availability_zone  = local.azs[count.index % length(local.azs)]

  engine                     = local.directory_instance.engine
  engine_version             = local.directory_instance.engine_version
  instance_class             = local.directory_instance.instance_class
  db_subnet_group_name       = local.directory_instance.db_subnet_group_name
  publicly_accessible        = local.directory_instance.publicly_accessible
  auto_minor_version_upgrade = local.directory_instance.auto_minor_version_upgrade
  copy_tags_to_snapshot      = true

  performance_insights_enabled          = true
  performance_insights_kms_key_id       = local.directory_instance.performance_insights_kms_key_id
  performance_insights_retention_period = 7
  monitoring_interval                   = local.directory_instance.monitoring_interval
  monitoring_role_arn                   = local.directory_instance.monitoring_role_arn

  tags       = local.tags
  depends_on = [aws_iam_role_policy_attachment.rds_monitoring]
}
