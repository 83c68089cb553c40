// The one console relay: the user's terminal (or a pipe) to a guest's serial console,
// for `kiln run` (the UART in this process) and `kiln console` (a VMM's serial socket).
// On a terminal: raw mode, Ctrl-A x quits (or detaches), Ctrl-A p presses the ACPI
// power button where there is one, Ctrl-A Ctrl-A sends a Ctrl-A. From a pipe: every
// byte goes to the guest as it is, and the end of the input is reported, so scripts can
// drive a guest shell.

const CTRL_A = 0x01;
const KEY_X = 0x78;
const KEY_P = 0x70;

export interface RelayTarget {
  /** Bytes for the guest. */
  send(bytes: Uint8Array): void;
  /** Ctrl-A x. */
  quit(): void;
  /** Ctrl-A p (absent: the key is sent on as typed). */
  powerButton?: () => void;
  /** Piped input ended. */
  inputEnded?: () => void;
}

/** Decodes what the user typed into bytes for the guest and escape commands (pure: tested alone). */
export class EscapeDecoder {
  private escape = false;

  constructor(private readonly target: RelayTarget) {}

  feed(chunk: Uint8Array): void {
    let start = 0;
    for (let i = 0; i < chunk.length; i++) {
      const byte = chunk[i]!;
      if (this.escape) {
        this.escape = false;
        if (byte === KEY_X) this.target.quit();
        else if (byte === KEY_P && this.target.powerButton) this.target.powerButton();
        else this.target.send(Uint8Array.of(byte));
        start = i + 1;
      } else if (byte === CTRL_A) {
        if (i > start) this.target.send(chunk.subarray(start, i));
        this.escape = true;
        start = i + 1;
      }
    }
    if (start < chunk.length) this.target.send(chunk.subarray(start));
  }
}

/** Connects stdin to `target` until the returned function is called. */
export function relayStdin(target: RelayTarget, stdin: NodeJS.ReadStream = process.stdin): () => void {
  const raw = stdin.isTTY === true;
  if (raw) stdin.setRawMode(true);
  const decoder = new EscapeDecoder(target);
  const onData = (chunk: Buffer) => (raw ? decoder.feed(chunk) : target.send(chunk));
  const onEnd = () => target.inputEnded?.();
  stdin.on('data', onData);
  stdin.on('end', onEnd);
  stdin.resume();
  return () => {
    stdin.off('data', onData);
    stdin.off('end', onEnd);
    if (raw) stdin.setRawMode(false);
    stdin.pause();
  };
}
