data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}

locals {
  name       = "${var.name}-${var.environment}"
  partition  = data.aws_partition.current.partition
  account_id = data.aws_caller_identity.current.account_id
  dns_suffix = data.aws_partition.current.dns_suffix

  # Key administration stays with the account's IAM policies (the root principal delegates).
  kms_root_statement = {
    Sid       = "AccountAdministersTheKeyThroughIAM"
    Effect    = "Allow"
    Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
    Action    = "kms:*"
    Resource  = "*"
  }

  tags = merge(var.tags, { "firstmile:environment" = var.environment })
}
