################################################################################
# Every CloudWatch log group of the region, in one place so that each is encrypted with the
# logs key and keeps var.log_retention_days. Each exists before the service that writes to it,
# which would otherwise create it itself, unencrypted and kept forever.
################################################################################

locals {
  log_groups = {
    flow_logs = "/aws/vpc-flow-logs/${local.name}"
    eks       = "/aws/eks/${local.cluster_name}/cluster"                 # the name EKS writes to
    aurora    = "/aws/rds/cluster/${local.aurora_identifier}/postgresql" # the name RDS writes to
    directory = "/aws/rds/cluster/${local.directory_identifier}/postgresql"
    msk       = "/aws/msk/${local.name}"
    redis     = "/aws/elasticache/${local.name}"
    waf       = "aws-waf-logs-${local.name}-api" # WAF accepts only names starting with aws-waf-logs-
  }
}

resource "aws_cloudwatch_log_group" "this" {
  for_each = local.log_groups

  name              = each.value
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.this["logs"].arn
  tags              = merge(local.tags, { "firstmile:log" = each.key })
}
