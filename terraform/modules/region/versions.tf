terraform {
  # 1.11: write-only arguments (master_password_wo, secret_string_wo) and ephemeral
  # resources keep the generated database and Redis secrets out of plans; 1.9+ lets a
  # variable's validation refer to other variables.
  required_version = ">= 1.11.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }
}
