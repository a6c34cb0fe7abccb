output "zone_id" {
  description = "ID of the public hosted zone; every region writes its API records into it."
  value       = aws_route53_zone.this.zone_id
}

output "domain_name" {
  description = "Name of the public hosted zone."
  value       = aws_route53_zone.this.name
}

output "name_servers" {
  description = "Name servers of the zone: the parent zone (or registrar) must delegate to them."
  value       = aws_route53_zone.this.name_servers
}

output "dnssec_ds_record" {
  description = "DS record the parent zone must publish once DNSSEC signing is on (null without DNSSEC)."
  value       = one(aws_route53_key_signing_key.this[*].ds_record)
}

output "directory_global_cluster_identifier" {
  description = "Identifier of the tenant directory's Aurora global cluster; each region's member joins it."
  value       = aws_rds_global_cluster.directory.global_cluster_identifier
}

output "directory_engine_version" {
  description = "Aurora PostgreSQL version every directory member must run."
  value       = var.directory.engine_version
}

output "directory_database_name" {
  description = "Database holding the tenant_directory table (created by firstmile tenants apply)."
  value       = aws_rds_global_cluster.directory.database_name
}
