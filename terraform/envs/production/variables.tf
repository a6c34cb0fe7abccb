variable "name" {
  description = "Name of the platform: the first part of every resource name."
  type        = string
  default     = "firstmile"
  nullable    = false
}

variable "environment" {
  description = "Name of this environment, part of every resource name and tag."
  type        = string
  default     = "production"
  nullable    = false
}

variable "tags" {
  description = "Tags on every resource of the environment (provider default_tags)."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "allowed_account_ids" {
  description = "AWS accounts this environment may be applied to: every provider refuses credentials of any other account. Null: no check (the offline tests)."
  type        = list(string)
  default     = null

  validation {
    condition     = var.allowed_account_ids == null || alltrue([for a in coalesce(var.allowed_account_ids, []) : can(regex("^[0-9]{12}$", a))])
    error_message = "allowed_account_ids must be 12-digit AWS account IDs."
  }
}

variable "domain_name" {
  description = "The environment's public DNS zone (made by the global module), e.g. firstmile.example.com."
  type        = string
  nullable    = false
}

variable "directory" {
  description = "The tenant directory's Aurora global database: engine_version and database_name (see modules/global)."
  type = object({
    engine_version = optional(string)
    database_name  = optional(string)
  })
  default  = {}
  nullable = false
}

variable "regions" {
  description = <<-EOT
    The regions of the environment, as data: a map from AWS region name (which is also the
    platform's FIRSTMILE_REGION) to its settings. Each entry needs vpc_cidr and may override
    the region module's defaults with the keys availability_zone_names, eks, aurora, msk, redis,
    audit_bucket, api_allowed_cidrs, api_rate_limit_per_5min and log_retention_days (attributes
    and defaults: modules/region/variables.tf). Typed `any`, like the node group maps of
    terraform-aws-eks, because entries override different attributes; the region module types
    every value, and the validations below refuse unknown keys, which a typed object would
    silently drop.
  EOT
  type        = any
  nullable    = false

  validation {
    condition     = can(keys(var.regions)) && length(var.regions) > 0
    error_message = "regions must be a map with at least one region."
  }

  validation {
    condition     = alltrue([for r in keys(var.regions) : contains(local.supported_regions, r)])
    error_message = "regions has a key that is not a region this environment has a provider for (${join(", ", local.supported_regions)}): add the region's provider and module block first (README.md, \"Adding a region\")."
  }

  validation {
    condition = alltrue([
      for r, s in var.regions : can(keys(s)) && length(setsubtract(keys(s), [
        "vpc_cidr", "availability_zone_names", "eks", "aurora", "msk", "redis", "audit_bucket",
        "api_allowed_cidrs", "api_rate_limit_per_5min", "log_retention_days",
      ])) == 0
    ])
    error_message = "regions has an entry with an unknown key: allowed are vpc_cidr, availability_zone_names, eks, aurora, msk, redis, audit_bucket, api_allowed_cidrs, api_rate_limit_per_5min and log_retention_days."
  }

  validation {
    condition = alltrue([
      for r, s in var.regions : can(cidrnetmask(s.vpc_cidr)) && try(
        cidrhost(s.vpc_cidr, 0) == split("/", s.vpc_cidr)[0] &&
        tonumber(split("/", s.vpc_cidr)[1]) >= 16 &&
        tonumber(split("/", s.vpc_cidr)[1]) <= 20,
      false)
    ])
    error_message = "Every region needs vpc_cidr, an IPv4 network address in CIDR notation with a prefix from /16 to /20, such as 10.20.0.0/16."
  }

  # Two ranges overlap when each starts before the other ends (addresses as 32-bit numbers).
  validation {
    condition = !can(keys(var.regions)) || alltrue(flatten([
      for a, sa in var.regions : [
        for b, sb in var.regions : a == b || !try(
          (
            sum([for i, o in split(".", cidrhost(sa.vpc_cidr, 0)) : tonumber(o) * pow(256, 3 - i)]) <=
            sum([for i, o in split(".", cidrhost(sb.vpc_cidr, -1)) : tonumber(o) * pow(256, 3 - i)])
            ) && (
            sum([for i, o in split(".", cidrhost(sb.vpc_cidr, 0)) : tonumber(o) * pow(256, 3 - i)]) <=
            sum([for i, o in split(".", cidrhost(sa.vpc_cidr, -1)) : tonumber(o) * pow(256, 3 - i)])
          ),
        false)
      ]
    ]))
    error_message = "Two regions have overlapping vpc_cidr blocks: give each region its own range, so that the VPCs can be peered."
  }
}

variable "primary_region" {
  description = "The region holding the tenant directory's writer (the others forward writes to it) and owning the shared API name's certificate validation. Must be a key of regions."
  type        = string
  nullable    = false

  validation {
    condition     = contains(keys(var.regions), var.primary_region)
    error_message = "primary_region must be one of the keys of regions."
  }
}
