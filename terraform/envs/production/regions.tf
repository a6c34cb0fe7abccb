################################################################################
# One block per provider alias of providers.tf. Each deploys its AWS region's entry of
# var.regions when there is one, and nothing otherwise.
################################################################################

module "region_us_east_1" {
  source    = "./region-stack"
  for_each  = local.stacks_by_provider["us-east-1"]
  providers = { aws = aws.us_east_1 }

  stack                         = each.value
  directory_primary_cluster_arn = local.directory_primary_cluster_arn
}

module "region_us_west_2" {
  source    = "./region-stack"
  for_each  = local.stacks_by_provider["us-west-2"]
  providers = { aws = aws.us_west_2 }

  stack                         = each.value
  directory_primary_cluster_arn = local.directory_primary_cluster_arn
}

module "region_eu_west_1" {
  source    = "./region-stack"
  for_each  = local.stacks_by_provider["eu-west-1"]
  providers = { aws = aws.eu_west_1 }

  stack                         = each.value
  directory_primary_cluster_arn = local.directory_primary_cluster_arn
}

module "region_eu_central_1" {
  source    = "./region-stack"
  for_each  = local.stacks_by_provider["eu-central-1"]
  providers = { aws = aws.eu_central_1 }

  stack                         = each.value
  directory_primary_cluster_arn = local.directory_primary_cluster_arn
}
