// What is left of the user's limits, live, in the line above their jobs (usage.ts words it): the day's spend goes
// back to 0 at midnight UTC without a write, so the line is drawn again each minute too. A listener the server
// refuses (rules without the usage match, a token revoked) hides it until a listener again, a while later (as the
// jobs' listener: 2 s, doubling), is answered (a soak audit: one refusal hid it for the page's life).
import { doc, onSnapshot, Timestamp, type Firestore } from "firebase/firestore";
import { $ } from "./dom";
import { nextRetry } from "./listening";
import { ServerClock, usageLine } from "./usage";

export function showUsage(db: Firestore, uid: string): void {
  let usage: Record<string, unknown> | undefined;
  let heardUsage = false;
  const serverClock = new ServerClock();
  const draw = () => ($("usage").textContent = usageLine(usage, serverClock.now()));
  let retryIn = 0;
  const listen = () =>
    onSnapshot(
      doc(db, "usage", uid),
      (snapshot) => {
        if (!snapshot.metadata.fromCache) retryIn = 0;
        usage = snapshot.data();
        const written = usage?.updated_at;
        if (written instanceof Timestamp && !snapshot.metadata.fromCache && !snapshot.metadata.hasPendingWrites) {
          serverClock.observe(written.toMillis(), Date.now(), heardUsage);
          heardUsage = true;
        }
        draw();
        $("usage").hidden = false;
      },
      () => {
        $("usage").hidden = true;
        retryIn = nextRetry(retryIn);
        setTimeout(listen, retryIn); // a failed listener is over: nothing to stop
      },
    );
  listen();
  setInterval(draw, 60_000);
}
