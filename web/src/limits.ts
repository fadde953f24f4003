// What is left of the user's limits, live, in the line above their jobs (usage.ts words it): the day's spend goes
// back to 0 at midnight UTC without a write, so the line is drawn again each minute too. A listener the server
// refuses (rules without the usage match) hides it.
import { doc, onSnapshot, Timestamp, type Firestore } from "firebase/firestore";
import { $ } from "./dom";
import { ServerClock, usageLine } from "./usage";

export function showUsage(db: Firestore, uid: string): void {
  let usage: Record<string, unknown> | undefined;
  let heardUsage = false;
  const serverClock = new ServerClock();
  const draw = () => ($("usage").textContent = usageLine(usage, serverClock.now()));
  onSnapshot(
    doc(db, "usage", uid),
    (snapshot) => {
      usage = snapshot.data();
      const written = usage?.updated_at;
      if (written instanceof Timestamp && !snapshot.metadata.fromCache && !snapshot.metadata.hasPendingWrites) {
        serverClock.observe(written.toMillis(), Date.now(), heardUsage);
        heardUsage = true;
      }
      draw();
      $("usage").hidden = false;
    },
    () => ($("usage").hidden = true),
  );
  setInterval(draw, 60_000);
}
