"""The router's parts: its config, the replicas' topology and health, replication with the
write log, and the fan-out of reads. service/router.py ties them into the Router that users
import; nothing here is meant to be imported from outside the service package."""
