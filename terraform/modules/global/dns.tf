################################################################################
# The environment's public zone. Each region adds its records (api.<domain> by latency,
# <region>.api.<domain>); the zone itself, its DNSSEC signing and its query logs live here.
################################################################################

resource "aws_route53_zone" "this" {
  name          = var.domain_name
  comment       = "${local.name}: public names of the platform"
  force_destroy = false
  tags          = local.tags
}

################################################################################
# Query logs: every query Route 53 answers for the zone, to an encrypted log group. Route 53
# delivers query logs only to log groups in us-east-1.
################################################################################

resource "aws_kms_key" "query_logs" {
  provider = aws.us_east_1

  description             = "${local.name}: Route 53 query logs of ${var.domain_name}"
  enable_key_rotation     = true
  rotation_period_in_days = 365
  deletion_window_in_days = 30
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      local.kms_root_statement,
      {
        Sid       = "CloudWatchLogsUsesTheKeyForThisAccountsLogGroups"
        Effect    = "Allow"
        Principal = { Service = "logs.us-east-1.${local.dns_suffix}" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnLike = { "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:us-east-1:${local.account_id}:log-group:*" }
        }
      },
    ]
  })
  tags = local.tags
}

resource "aws_cloudwatch_log_group" "query_logs" {
  provider = aws.us_east_1

  name              = "/aws/route53/${var.domain_name}"
  retention_in_days = var.query_log_retention_days
  kms_key_id        = aws_kms_key.query_logs.arn
  tags              = local.tags
}

resource "aws_cloudwatch_log_resource_policy" "query_logs" {
  provider = aws.us_east_1

  policy_name = "${local.name}-route53-query-logs"
  policy_document = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "route53.${local.dns_suffix}" }
      Action    = ["logs:CreateLogStream", "logs:PutLogEvents"]
      Resource  = "${aws_cloudwatch_log_group.query_logs.arn}:*"
      Condition = {
        StringEquals = { "aws:SourceAccount" = local.account_id }
        ArnLike      = { "aws:SourceArn" = aws_route53_zone.this.arn }
      }
    }]
  })
}

resource "aws_route53_query_log" "this" {
  zone_id                  = aws_route53_zone.this.zone_id
  cloudwatch_log_group_arn = aws_cloudwatch_log_group.query_logs.arn

  depends_on = [aws_cloudwatch_log_resource_policy.query_logs]
}

################################################################################
# DNSSEC: Route 53 signs with a key-signing key backed by an asymmetric KMS key in us-east-1.
################################################################################

resource "aws_kms_key" "dnssec" {
  count    = var.enable_dnssec ? 1 : 0
  provider = aws.us_east_1

  description              = "${local.name}: DNSSEC key-signing key of ${var.domain_name}"
  customer_master_key_spec = "ECC_NIST_P256"
  key_usage                = "SIGN_VERIFY"
  deletion_window_in_days  = 30
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      local.kms_root_statement,
      {
        Sid       = "Route53SignsWithTheKey"
        Effect    = "Allow"
        Principal = { Service = "dnssec-route53.${local.dns_suffix}" }
        Action    = ["kms:DescribeKey", "kms:GetPublicKey", "kms:Sign"]
        Resource  = "*"
        Condition = {
          StringEquals = { "aws:SourceAccount" = local.account_id }
          ArnLike      = { "aws:SourceArn" = "arn:${local.partition}:route53:::hostedzone/*" }
        }
      },
      {
        Sid       = "Route53GrantsItselfTheKey"
        Effect    = "Allow"
        Principal = { Service = "dnssec-route53.${local.dns_suffix}" }
        Action    = "kms:CreateGrant"
        Resource  = "*"
        Condition = { Bool = { "kms:GrantIsForAWSResource" = "true" } }
      },
    ]
  })
  tags = local.tags
}

resource "aws_route53_key_signing_key" "this" {
  count = var.enable_dnssec ? 1 : 0

  hosted_zone_id             = aws_route53_zone.this.id
  key_management_service_arn = aws_kms_key.dnssec[0].arn
  name                       = replace(local.name, "-", "_")
}

resource "aws_route53_hosted_zone_dnssec" "this" {
  count = var.enable_dnssec ? 1 : 0

  hosted_zone_id = aws_route53_key_signing_key.this[0].hosted_zone_id
  signing_status = "SIGNING"
}
