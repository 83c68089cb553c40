// The manager verbs' help text (kept apart so `kiln run` does not load the manager).
export const MANAGER_USAGE = `
VM manager commands (state in $KILN_STATE_DIR, else /var/lib/kiln as root or ~/.local/state/kiln):
  create NAME [--kernel P] [--initrd P] [--cmdline T] [--cpus N] [--memory SIZE] [--disk PATH[,ro][,root]]...
              [--net tap=NAME[,mac=MAC]]... [--rng] [--vsock CID,SOCKET] [--balloon SIZE]
              [--cpu-weight 1-10000] [--cpu-quota PERCENT] [--pin CPU[,CPU...]]
  create -f FILE      the same as JSON or YAML (name, kernel, cpus, memoryMiB, disks, nets, ...)
  start|stop|pause|resume|restart|rm NAME    (stop: ACPI power button, then SIGTERM; --force: at once)
  ls | info NAME | logs NAME [--bytes N] | console NAME (follows the serial console log)
  daemon              run the manager in the foreground (the verbs start it when needed)
  --json              on ls, info, logs, create, start, stop, ...: one JSON document
`;
