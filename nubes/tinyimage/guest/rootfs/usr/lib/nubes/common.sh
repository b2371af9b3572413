# Shared by the nubes guest scripts: paths and the serial contract.
PATH=/bin
export PATH
NUBES_RUN=/run/nubes
NUBES_STATE=/var/lib/nubes
TRACING=/sys/kernel/tracing

# One machine-readable line on the serial console: "nubes-guest: <event> <args>".
say() {
    echo "nubes-guest: $*" >/dev/console
}

uptime_seconds() {
    read -r seconds _ </proc/uptime
    echo "$seconds"
}
