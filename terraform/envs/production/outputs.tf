output "zone_id" {
  description = "The environment's public hosted zone."
  value       = module.global.zone_id
}

output "name_servers" {
  description = "Name servers the parent zone must delegate the domain to."
  value       = module.global.name_servers
}

output "dnssec_ds_record" {
  description = "DS record the parent zone must publish for DNSSEC."
  value       = module.global.dnssec_ds_record
}

output "directory_global_cluster_identifier" {
  description = "The tenant directory's Aurora global cluster."
  value       = module.global.directory_global_cluster_identifier
}

output "regions" {
  description = "Per region: what the Helm release of that region needs (cluster, endpoints, secrets, IRSA role ARNs, GPU selector and taint, API target group and URLs, the models volume's EFS file system)."
  value = {
    for region, m in local.region_modules : region => {
      cluster_name                     = m.region.cluster_name
      api_urls                         = m.region.api_urls
      api_target_group_arn             = m.region.api_target_group_arn
      workload_role_arns               = m.region.workload_role_arns
      gpu_node_selector                = m.region.gpu_node_selector
      gpu_node_taint                   = m.region.gpu_node_taint
      aurora_cluster_endpoint          = m.region.aurora_cluster_endpoint
      aurora_master_user_secret_arn    = m.region.aurora_master_user_secret_arn
      directory_endpoint               = m.region.directory_endpoint
      msk_bootstrap_brokers_sasl_scram = m.region.msk_bootstrap_brokers_sasl_scram
      msk_scram_secret_arn             = m.region.msk_scram_secret_arn
      msk_bootstrap_brokers_sasl_iam   = m.region.msk_bootstrap_brokers_sasl_iam
      redis_primary_endpoint           = m.region.redis_primary_endpoint
      redis_auth_secret_arn            = m.region.redis_auth_secret_arn
      efs_file_system_id               = m.region.efs_file_system_id
      audit_bucket                     = m.region.audit_bucket
    }
  }
}
