################################################################################
# EFS: the model registry volume (the chart's models PersistentVolumeClaim, ReadWriteMany),
# shared by the API, the scheduler and the Ray pods on every node of the region. Encrypted with
# the efs key, reachable only through a mount target in each private (node and pod) subnet, from
# the EKS cluster's security group only, and only over TLS. The EKS add-on aws-efs-csi-driver
# mounts it; its controller provisions one access point per claim (StorageClass with
# provisioningMode efs-ap and fileSystemId = outputs.efs_file_system_id, which the deployer
# creates: this module makes no Kubernetes objects).
################################################################################

resource "aws_security_group" "efs" {
  name        = "${local.name}-efs"
  description = "EFS of ${local.name} (model registry): NFS over TLS on 2049 from the EKS cluster only"
  vpc_id      = aws_vpc.this.id
  tags        = merge(local.tags, { Name = "${local.name}-efs" })
}

resource "aws_vpc_security_group_ingress_rule" "efs_from_eks" {
  security_group_id            = aws_security_group.efs.id
  description                  = "NFS (EFS mount helper over TLS) from the EKS nodes and pods"
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
  referenced_security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

resource "aws_efs_file_system" "models" {
  creation_token = "${local.name}-models"
  encrypted      = true
  kms_key_id     = aws_kms_key.this["efs"].arn

  # Model loads are rare bursts of large reads on a small file system: Elastic throughput follows
  # them, where Bursting would give a 20 GiB file system about 1 MiB/s once its credits are spent.
  performance_mode = "generalPurpose"
  throughput_mode  = "elastic"

  tags = merge(local.tags, { Name = "${local.name}-models" })
}

resource "aws_efs_mount_target" "models" {
  for_each = aws_subnet.private

  file_system_id  = aws_efs_file_system.models.id
  subnet_id       = each.value.id
  security_groups = [aws_security_group.efs.id]
}

# NFS clients without IAM credentials (the CSI driver's default) are the anonymous principal:
# they may mount and write through a mount target of this VPC, never as root (access points give
# each claim its own POSIX identity), and nothing may reach the file system without TLS.
resource "aws_efs_file_system_policy" "models" {
  file_system_id = aws_efs_file_system.models.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "MountAndWriteThroughAMountTarget"
        Effect    = "Allow"
        Principal = { AWS = "*" }
        Action    = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"]
        Resource  = aws_efs_file_system.models.arn
        Condition = { Bool = { "elasticfilesystem:AccessedViaMountTarget" = "true" } }
      },
      {
        Sid       = "DenyWithoutTLS"
        Effect    = "Deny"
        Principal = { AWS = "*" }
        Action    = "*"
        Resource  = aws_efs_file_system.models.arn
        Condition = { Bool = { "aws:SecureTransport" = "false" } }
      },
    ]
  })
}

# The registry's models are trained outside the cluster and copied in; a daily copy in the
# region's vault (backup.tf, kept aurora.aws_backup_retention_days like the databases') outlives
# a deleted file system.
resource "aws_backup_selection" "models" {
  name         = "models"
  plan_id      = aws_backup_plan.this.id
  iam_role_arn = aws_iam_role.backup.arn
  resources    = [aws_efs_file_system.models.arn]
}

################################################################################
# The EFS CSI driver, an EKS managed add-on. EKS puts the role below on both of its service
# accounts (the controller's, which creates and deletes access points, and the node DaemonSet's,
# whose mount helper may look up mount targets), so the role trusts exactly those two.
################################################################################

locals {
  efs_csi_service_accounts = ["efs-csi-controller-sa", "efs-csi-node-sa"]
}

resource "aws_iam_role" "efs_csi" {
  name        = "${local.global_name}-efs-csi"
  description = "IRSA role of the EFS CSI driver (kube-system/efs-csi-controller-sa, kube-system/efs-csi-node-sa) in the ${local.cluster_name} cluster"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Federated = aws_iam_openid_connect_provider.eks.arn }
      Action    = "sts:AssumeRoleWithWebIdentity"
      Condition = {
        StringEquals = {
          "${local.oidc_issuer}:sub" = [for sa in local.efs_csi_service_accounts : "system:serviceaccount:kube-system:${sa}"]
          "${local.oidc_issuer}:aud" = "sts.${local.dns_suffix}"
        }
      }
    }]
  })
  max_session_duration = 3600
  tags                 = local.tags
}

# AWS's policy for the driver: describe calls, and access points created and deleted only with
# the driver's tag (efs.csi.aws.com/cluster); it follows the driver's needs as it changes.
resource "aws_iam_role_policy_attachment" "efs_csi" {
  role       = aws_iam_role.efs_csi.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonEFSCSIDriverPolicy"
}

resource "aws_eks_addon" "efs_csi" {
  cluster_name                = aws_eks_cluster.this.name
  addon_name                  = "aws-efs-csi-driver"
  service_account_role_arn    = aws_iam_role.efs_csi.arn
  resolve_conflicts_on_update = "OVERWRITE"
  tags                        = local.tags

  # The controller needs nodes to run on, and its role before it starts.
  depends_on = [aws_eks_node_group.this, aws_iam_role_policy_attachment.efs_csi]
}
