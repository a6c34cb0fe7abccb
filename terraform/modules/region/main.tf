data "aws_region" "current" {}
data "aws_partition" "current" {}
data "aws_caller_identity" "current" {}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Only the first three zones are used (slice, sorted by name), so a new zone does not change the set; availability_zone_names pins them explicitly where that matters.
  state = "available"

  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

locals {
  region     = data.aws_region.current.name
  partition  = data.aws_partition.current.partition
  account_id = data.aws_caller_identity.current.account_id
  dns_suffix = data.aws_partition.current.dns_suffix

  # Regional resources are unique per region already; IAM roles and S3 buckets are global,
  # so their names carry the region (and the buckets the account).
  name        = "${var.name}-${var.environment}"
  global_name = "${local.name}-${local.region}"

  azs = length(var.availability_zone_names) > 0 ? var.availability_zone_names : slice(data.aws_availability_zones.available.names, 0, min(3, length(data.aws_availability_zones.available.names)))

  # Trust policies of the roles AWS services assume for the region (EKS also tags its sessions).
  service_role_actions = {
    "eks"            = ["sts:AssumeRole", "sts:TagSession"]
    "ec2"            = ["sts:AssumeRole"]
    "monitoring.rds" = ["sts:AssumeRole"]
    "backup"         = ["sts:AssumeRole"]
  }
  service_trust = {
    for service, actions in local.service_role_actions : service => jsonencode({
      Version = "2012-10-17"
      Statement = [{
        Effect    = "Allow"
        Principal = { Service = "${service}.${local.dns_suffix}" }
        Action    = actions
      }]
    })
  }

  tags = merge(var.tags, {
    "firstmile:environment" = var.environment
    "firstmile:region"      = local.region
  })
}
