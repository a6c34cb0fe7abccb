################################################################################
# Audit bucket: signed audit checkpoints and log archives of the region's tenants.
# Object Lock in COMPLIANCE mode: no object version can be deleted or overwritten by anyone,
# the root user included, before its retention ends, and the retention cannot be shortened.
# Audit data stays in its region (no replication), like the tenants' other data.
################################################################################

locals {
  audit_bucket_name = "${local.global_name}-audit-${local.account_id}"
  logs_bucket_name  = "${local.global_name}-logs-${local.account_id}"

  # Requests without TLS 1.2 are refused on both buckets, whoever makes them.
  deny_insecure_transport = [
    {
      Sid       = "DenyRequestsWithoutTLS"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    },
    {
      Sid       = "DenyTLSBelow12"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Condition = { NumericLessThan = { "s3:TlsVersion" = "1.2" } }
    },
  ]
}

resource "aws_s3_bucket" "audit" {
  #checkov:skip=CKV_AWS_144:Audit data stays in its tenants' home region (data residency); Object Lock and versioning protect it, AWS keeps S3 data across three zones.
  #checkov:skip=CKV2_AWS_62:No process reacts to new audit objects; they are read on demand (proof verification, audits).
  bucket              = local.audit_bucket_name
  object_lock_enabled = true
  force_destroy       = false
  tags                = merge(local.tags, { "firstmile:data" = "audit" })
}

resource "aws_s3_bucket_server_side_encryption_configuration" "audit" {
  bucket = aws_s3_bucket.audit.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.this["s3"].arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_object_lock_configuration" "audit" {
  bucket = aws_s3_bucket.audit.id
  rule {
    default_retention {
      mode = "COMPLIANCE"
      days = var.audit_bucket.object_lock_retention_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

resource "aws_s3_bucket_lifecycle_configuration" "audit" {
  bucket = aws_s3_bucket.audit.id

  rule {
    id     = "archives-to-glacier-ir"
    status = "Enabled"
    filter {
      prefix = "archives/"
    }
    transition {
      days          = var.audit_bucket.archive_transition_days
      storage_class = "GLACIER_IR"
    }
  }

  # Versions replaced before their retention ended stay until it ends (Object Lock refuses the
  # deletion before then); afterwards they go.
  rule {
    id     = "noncurrent-after-retention"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.audit_bucket.object_lock_retention_days + 1
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

resource "aws_s3_bucket_logging" "audit" {
  bucket        = aws_s3_bucket.audit.id
  target_bucket = aws_s3_bucket.logs.id
  target_prefix = "s3/${aws_s3_bucket.audit.id}/"
}

resource "aws_s3_bucket_policy" "audit" {
  bucket = aws_s3_bucket.audit.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      [for s in local.deny_insecure_transport : merge(s, { Resource = [aws_s3_bucket.audit.arn, "${aws_s3_bucket.audit.arn}/*"] })],
      [
        {
          Sid       = "DenyObjectsNotUnderTheAuditKey"
          Effect    = "Deny"
          Principal = "*"
          Action    = "s3:PutObject"
          Resource  = "${aws_s3_bucket.audit.arn}/*"
          Condition = {
            StringNotEqualsIfExists = {
              "s3:x-amz-server-side-encryption-aws-kms-key-id" = aws_kms_key.this["s3"].arn
            }
          }
        },
      ],
    )
  })

  depends_on = [aws_s3_bucket_public_access_block.this]
}

################################################################################
# What both buckets share: ACLs off, no public access of any kind, versioning.
################################################################################

locals {
  buckets = {
    audit = aws_s3_bucket.audit.id
    logs  = aws_s3_bucket.logs.id
  }
}

resource "aws_s3_bucket_ownership_controls" "this" {
  for_each = local.buckets

  bucket = each.value
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each = local.buckets

  bucket                  = each.value
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# Object Lock needs versioning; on the log bucket it keeps a log from being overwritten.
resource "aws_s3_bucket_versioning" "this" {
  for_each = local.buckets

  bucket = each.value
  versioning_configuration {
    status = "Enabled"
  }
}

################################################################################
# Log bucket: ALB access logs and S3 server access logs of the region. Both services deliver
# only to buckets encrypted with S3-managed keys (SSE-S3), hence no KMS key here.
################################################################################

data "aws_elb_service_account" "current" {}

resource "aws_s3_bucket" "logs" {
  #checkov:skip=CKV_AWS_144:Access logs are operational data of this region; they stay in it like the rest of the region's data.
  #checkov:skip=CKV_AWS_145:ALB access logs and S3 server access logs are delivered only to buckets encrypted with SSE-S3 (AES256), not SSE-KMS.
  #checkov:skip=CKV2_AWS_62:Nothing consumes events of the log bucket; logs are read on demand (Athena, downloads).
  bucket        = local.logs_bucket_name
  force_destroy = false
  tags          = merge(local.tags, { "firstmile:data" = "access-logs" })
}

resource "aws_s3_bucket_server_side_encryption_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "logs" {
  bucket = aws_s3_bucket.logs.id

  rule {
    id     = "expire-access-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.access_log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

resource "aws_s3_bucket_policy" "logs" {
  bucket = aws_s3_bucket.logs.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      [for s in local.deny_insecure_transport : merge(s, { Resource = [aws_s3_bucket.logs.arn, "${aws_s3_bucket.logs.arn}/*"] })],
      [
        {
          Sid       = "S3ServerAccessLogsFromThisAccount"
          Effect    = "Allow"
          Principal = { Service = "logging.s3.${local.dns_suffix}" }
          Action    = "s3:PutObject"
          Resource  = "${aws_s3_bucket.logs.arn}/s3/*"
          Condition = { StringEquals = { "aws:SourceAccount" = local.account_id } }
        },
        {
          # Regions opened before August 2022 deliver from the region's ELB account, newer
          # ones through the log delivery service.
          Sid    = "AlbAccessLogs"
          Effect = "Allow"
          Principal = {
            AWS     = data.aws_elb_service_account.current.arn
            Service = "logdelivery.elasticloadbalancing.${local.dns_suffix}"
          }
          Action   = "s3:PutObject"
          Resource = "${aws_s3_bucket.logs.arn}/alb/AWSLogs/${local.account_id}/*"
        },
      ],
    )
  })

  depends_on = [aws_s3_bucket_public_access_block.this]
}
