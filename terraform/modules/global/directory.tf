################################################################################
# The tenant directory: an Aurora PostgreSQL global database. It holds only slug -> (tenant id,
# home region) (docs/operations.md, "Regional routing"); tenant data never enters it and stays
# in each region's own cluster. The first member that joins (the primary region's) becomes the
# writer; see the region module's directory.tf.
################################################################################

resource "aws_rds_global_cluster" "directory" {
  global_cluster_identifier = "${local.name}-directory"
  engine                    = "aurora-postgresql"
  engine_version            = var.directory.engine_version
  database_name             = var.directory.database_name
  storage_encrypted         = true
  deletion_protection       = true
  force_destroy             = false

  tags = local.tags

  lifecycle {
    # Minor upgrades are applied to the members; the global cluster then reports the new
    # version, which is not a change to undo.
    ignore_changes = [engine_version]
  }
}
