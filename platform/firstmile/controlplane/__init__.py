"""The tenant control plane: ``firstmile tenants plan|apply`` reconciles manifests into every system.

One manifest per tenant is the source of truth; applying it touches the database (tenant,
paths), the tenant's data keys (its key provider), the region's Kafka topics, the global
tenant directory and Keycloak (realm, clients, roles, the customer's SAML IdP). This slice
orchestrates the slices that own each of those; it holds no state of its own.
"""
