################################################################################
# AWS Backup: daily copies of the region's database and of the directory's primary member (and
# of the models file system, selected in efs.tf) into a vault encrypted with the backup key.
# Unlike Aurora's own automated backups, these recovery points outlive the cluster (a deleted
# cluster takes its automated backups with it after the retention period) and have their own
# retention.
################################################################################

resource "aws_backup_vault" "this" {
  name          = local.name
  kms_key_arn   = aws_kms_key.this["backup"].arn
  force_destroy = false
  tags          = local.tags
}

resource "aws_backup_plan" "this" {
  name = local.name

  rule {
    rule_name         = "daily"
    target_vault_name = aws_backup_vault.this.name
    schedule          = "cron(0 5 * * ? *)"
    start_window      = 60
    completion_window = 360

    lifecycle {
      delete_after = var.aurora.aws_backup_retention_days
    }

    recovery_point_tags = local.tags
  }

  tags = local.tags
}

resource "aws_iam_role" "backup" {
  name               = "${local.global_name}-backup"
  assume_role_policy = local.service_trust["backup"]
  tags               = local.tags
}

resource "aws_iam_role_policy_attachment" "backup" {
  for_each = toset(["AWSBackupServiceRolePolicyForBackup", "AWSBackupServiceRolePolicyForRestores"])

  role       = aws_iam_role.backup.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/${each.value}"
}

resource "aws_backup_selection" "databases" {
  name         = "databases"
  plan_id      = aws_backup_plan.this.id
  iam_role_arn = aws_iam_role.backup.arn
  resources    = concat([aws_rds_cluster.this.arn], aws_rds_cluster.directory_primary[*].arn)
}
