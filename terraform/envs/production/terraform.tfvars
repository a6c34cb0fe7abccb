# The production environment, as data. Adding a region: README.md, "Adding a region".
# domain_name and allowed_account_ids are the organisation's own; replace the placeholders
# before the first apply.

environment = "production"
domain_name = "firstmile.example.com"

# The tenant directory's writer lives here; the other regions forward writes to it.
primary_region = "eu-west-1"

regions = {
  "eu-west-1" = {
    vpc_cidr = "10.20.0.0/16"
  }

  "us-east-1" = {
    vpc_cidr = "10.30.0.0/16"
    # g6 capacity is scarcer here: let the GPU group fall back to g5.
    eks = {
      gpu_nodes = { instance_types = ["g6.xlarge", "g5.xlarge", "g5.2xlarge"] }
    }
  }
}
