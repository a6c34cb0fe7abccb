variable "name" {
  description = "Name of the platform: the first part of every resource name (with environment)."
  type        = string
  default     = "firstmile"
  nullable    = false

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,11}$", var.name))
    error_message = "name must be 2 to 12 characters of lower-case letters, digits and hyphens, starting with a letter."
  }
}

variable "environment" {
  description = "Environment (production, staging, ...). Part of every resource name and of the tags."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^[a-z][a-z0-9]{1,11}$", var.environment))
    error_message = "environment must be 2 to 12 lower-case letters and digits, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource that takes tags (on top of the provider's default_tags)."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "domain_name" {
  description = "The environment's public DNS zone, e.g. firstmile.example.com. Its parent must delegate to the zone's name servers (output name_servers) and, with DNSSEC, publish its DS record (output dnssec_ds_record)."
  type        = string
  nullable    = false

  validation {
    condition     = can(regex("^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\\.)+[a-z]{2,63}$", var.domain_name))
    error_message = "domain_name must be a lower-case DNS name such as firstmile.example.com, without a trailing dot."
  }
}

variable "enable_dnssec" {
  description = "Sign the zone with DNSSEC (a KMS key in us-east-1). The parent zone must then publish the DS record, a step outside this module."
  type        = bool
  default     = true
  nullable    = false
}

variable "query_log_retention_days" {
  description = "Retention of the zone's Route 53 query logs, in days."
  type        = number
  default     = 365
  nullable    = false

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.query_log_retention_days)
    error_message = "query_log_retention_days must be one of the retention periods CloudWatch Logs accepts: 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653."
  }
}

variable "directory" {
  description = "The tenant directory's Aurora global database (FIRSTMILE_DIRECTORY_URL): engine version and database name. Its members, one per region, are made by the region module."
  type = object({
    engine_version = optional(string, "16.6")
    database_name  = optional(string, "firstmile_directory")
  })
  default  = {}
  nullable = false

  validation {
    condition     = can(regex("^[0-9]{2}\\.[0-9]+$", var.directory.engine_version))
    error_message = "directory.engine_version must be an Aurora PostgreSQL version such as 16.6 (global write forwarding needs 14.9, 15.4 or later)."
  }

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_]{0,62}$", var.directory.database_name))
    error_message = "directory.database_name must be a PostgreSQL identifier: lower-case letters, digits and underscores, not starting with a digit."
  }
}
