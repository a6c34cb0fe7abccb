################################################################################
# Maps one entry of the environment's regions map (already merged with what every region
# shares) onto the region module. It exists so that each per-provider block of regions.tf stays
# a few lines; all defaults and types live in the region module.
################################################################################

terraform {
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }
}

variable "stack" {
  description = "One region's settings: its entry of var.regions merged with name, environment, directory and dns (see the environment's main.tf)."
  type        = any
  nullable    = false
}

variable "directory_primary_cluster_arn" {
  description = "ARN of the directory's primary cluster, null until the primary region's module knows it. Separate from stack: the primary region's own directory resources must not depend on it."
  type        = string
  default     = null
}

module "region" {
  source = "../../../modules/region"

  name        = var.stack.name
  environment = var.stack.environment
  vpc_cidr    = var.stack.vpc_cidr
  directory   = var.stack.directory
  dns         = var.stack.dns

  directory_primary_cluster_arn = var.directory_primary_cluster_arn

  availability_zone_names = try(var.stack.availability_zone_names, [])
  eks                     = try(var.stack.eks, {})
  aurora                  = try(var.stack.aurora, {})
  msk                     = try(var.stack.msk, {})
  redis                   = try(var.stack.redis, {})
  audit_bucket            = try(var.stack.audit_bucket, {})
  api_allowed_cidrs       = try(var.stack.api_allowed_cidrs, ["0.0.0.0/0"])
  api_rate_limit_per_5min = try(var.stack.api_rate_limit_per_5min, 20000)
  log_retention_days      = try(var.stack.log_retention_days, 365)
}

output "directory_primary_cluster_arn" {
  description = "The region module's directory_primary_cluster_arn (null outside the primary region)."
  value       = module.region.directory_primary_cluster_arn
}

output "region" {
  description = "Every output of the region module."
  value       = module.region
}
