"""The embed slice: what a tenant's web page shows its signed-in user through the embed SDK.

One user's own checklist (their path, progress, available and locked steps) and in-app messages, live,
for a publishable key (``fmpk_``) used from one of its origins with an identity token the tenant's backend
signed (the ``auth`` slice checks all three and makes the principal). ``docs/embed.md`` describes it.
"""
