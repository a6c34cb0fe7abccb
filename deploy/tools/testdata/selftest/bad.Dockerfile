# hadolint must reject this: an unpinned `latest` base (DL3007).
FROM debian:latest
USER 65532
CMD ["true"]
