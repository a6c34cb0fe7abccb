################################################################################
# The environment: one global stack and one stack per entry of var.regions.
################################################################################

module "global" {
  source = "../../modules/global"
  providers = {
    aws           = aws
    aws.us_east_1 = aws.us_east_1
  }

  name        = var.name
  environment = var.environment
  domain_name = var.domain_name
  directory   = { for k, v in var.directory : k => v if v != null }
}

locals {
  # What every region stack gets besides its own entry of var.regions: the names, the global
  # resources, and its part in the directory and the shared API name.
  region_stacks = {
    for region, settings in var.regions : region => merge(settings, {
      name        = var.name
      environment = var.environment
      directory = {
        global_cluster_identifier = module.global.directory_global_cluster_identifier
        role                      = region == var.primary_region ? "primary" : "secondary"
        engine_version            = module.global.directory_engine_version
        database_name             = module.global.directory_database_name
      }
      dns = {
        zone_id                = module.global.zone_id
        domain_name            = var.domain_name
        owns_shared_validation = region == var.primary_region
      }
    })
  }

  # The module blocks of regions.tf select their entry by AWS region: zero or one stack each.
  stacks_by_provider = {
    for region in local.supported_regions : region => {
      for k, stack in local.region_stacks : k => stack if k == region
    }
  }

  region_modules = merge(
    module.region_us_east_1,
    module.region_us_west_2,
    module.region_eu_west_1,
    module.region_eu_central_1,
  )

  # The secondaries attach once the primary's writer exists; the output carries that wait. Each
  # module is indexed by its static key so that only that output is referenced: naming a whole
  # module here would make every secondary wait for itself (a cycle).
  directory_primary_cluster_arn = one([
    for arn in [
      try(module.region_us_east_1["us-east-1"].directory_primary_cluster_arn, null),
      try(module.region_us_west_2["us-west-2"].directory_primary_cluster_arn, null),
      try(module.region_eu_west_1["eu-west-1"].directory_primary_cluster_arn, null),
      try(module.region_eu_central_1["eu-central-1"].directory_primary_cluster_arn, null),
    ] : arn if arn != null
  ])
}
