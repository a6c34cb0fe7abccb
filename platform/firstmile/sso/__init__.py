"""Single sign-on: tenant realms in Keycloak, validation of the tokens they issue."""
