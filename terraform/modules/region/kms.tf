################################################################################
# One customer-managed key per purpose, so that a grant or a key policy for one data store
# never opens another, and each key's CloudTrail usage reads as one service's.
################################################################################

locals {
  kms_purposes = {
    eks         = "EKS Kubernetes secrets envelope encryption"
    ebs         = "EBS volumes of the EKS nodes"
    aurora      = "Aurora storage, snapshots and Performance Insights of the region's database and the directory member"
    msk         = "MSK broker storage"
    msk_scram   = "Secrets Manager secret of the MSK SASL/SCRAM user (MSK refuses secrets under the default key)"
    elasticache = "ElastiCache Redis storage and snapshots"
    efs         = "EFS file system of the model registry volume"
    s3          = "S3 audit checkpoints and archives"
    logs        = "CloudWatch Logs of the region"
    secrets     = "Secrets Manager secrets of the region (database master users, Redis AUTH token)"
    backup      = "AWS Backup vault of the region's databases"
  }

  account_root = "arn:${local.partition}:iam::${local.account_id}:root"

  # Key administration stays with the account's IAM policies (the root principal delegates to
  # them); services get only what they need beyond that.
  kms_root_statement = {
    Sid       = "AccountAdministersTheKeyThroughIAM"
    Effect    = "Allow"
    Principal = { AWS = local.account_root }
    Action    = "kms:*"
    Resource  = "*"
  }

  kms_service_statements = {
    logs = [{
      Sid       = "CloudWatchLogsUsesTheKeyForThisAccountsLogGroups"
      Effect    = "Allow"
      Principal = { Service = "logs.${local.region}.${local.dns_suffix}" }
      Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
      Resource  = "*"
      Condition = {
        ArnLike = {
          "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:*"
        }
      }
    }]
    # Managed node groups launch through EC2 Auto Scaling, whose service-linked role must be
    # able to use the key of the encrypted root volumes.
    ebs = [
      {
        Sid       = "AutoScalingUsesTheKeyForNodeVolumes"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:role/aws-service-role/autoscaling.${local.dns_suffix}/AWSServiceRoleForAutoScaling" }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
        Resource  = "*"
      },
      {
        Sid       = "AutoScalingGrantsTheKeyToEC2"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:role/aws-service-role/autoscaling.${local.dns_suffix}/AWSServiceRoleForAutoScaling" }
        Action    = "kms:CreateGrant"
        Resource  = "*"
        Condition = { Bool = { "kms:GrantIsForAWSResource" = "true" } }
      },
    ]
  }
}

resource "aws_kms_key" "this" {
  for_each = local.kms_purposes

  description             = "${local.name} ${local.region}: ${each.value}"
  enable_key_rotation     = true
  rotation_period_in_days = 365
  deletion_window_in_days = 30
  policy = jsonencode({
    Version   = "2012-10-17"
    Statement = concat([local.kms_root_statement], lookup(local.kms_service_statements, each.key, []))
  })

  tags = merge(local.tags, { "firstmile:purpose" = each.key })
}

resource "aws_kms_alias" "this" {
  for_each = local.kms_purposes

  name          = "alias/${local.name}/${each.key}"
  target_key_id = aws_kms_key.this[each.key].key_id
}
