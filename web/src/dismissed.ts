// The failed and cancelled jobs a user dismissed, in this browser only (firestore.rules let no client delete a
// job): their keys ("videos/<file_uid>") in localStorage, per project and user. Where storage is refused (a
// private window's quota, storage turned off) they are kept for this page's life.

/** The most keys kept, the latest dismissed: a user with more jobs than a page lists forgets no deleted job's key
 * (`keepOnly` needs the whole history listed), and the list grew with every dismissal (a soak audit). */
export const DISMISSED_MAX = 1000;

export class Dismissed {
  private readonly storageKey: string;
  private keys = new Set<string>();

  constructor(projectId: string, uid: string) {
    this.storageKey = `firegen.dismissed/${projectId}/${uid}`;
    this.reload();
  }

  /** Whether a storage event (another tab) is about this user's dismissed jobs. */
  concerns(event: StorageEvent): boolean {
    return event.key === this.storageKey || event.key === null;
  }

  reload(): void {
    try {
      const stored: unknown = JSON.parse(localStorage.getItem(this.storageKey) ?? "[]");
      this.keys = new Set(Array.isArray(stored) ? stored.filter((key): key is string => typeof key === "string") : []);
    } catch {
      // Unreadable (or storage refused): what this page has stands.
    }
  }

  has(key: string): boolean {
    return this.keys.has(key);
  }

  add(key: string): void {
    this.reload(); // what another tab saved meanwhile stands
    this.keys.delete(key); // the latest dismissed last: the first to go are the longest dismissed
    this.keys.add(key);
    for (const old of this.keys) {
      if (this.keys.size <= DISMISSED_MAX) break;
      this.keys.delete(old);
    }
    this.save();
  }

  /** Forget these keys (jobs that run again: dismissed no more). */
  forget(keys: string[]): void {
    if (!keys.some((key) => this.keys.has(key))) return;
    this.reload();
    for (const key of keys) this.keys.delete(key);
    this.save();
  }

  clear(): void {
    this.keys.clear();
    this.save();
  }

  /** Forget the jobs no longer listed (deleted at their expiry): the list would otherwise only grow. */
  keepOnly(listed: Set<string>): void {
    const before = this.keys.size;
    for (const key of this.keys) if (!listed.has(key)) this.keys.delete(key);
    if (this.keys.size !== before) this.save();
  }

  private save(): void {
    try {
      if (this.keys.size) localStorage.setItem(this.storageKey, JSON.stringify([...this.keys]));
      else localStorage.removeItem(this.storageKey);
    } catch {
      // Refused: kept in this page only.
    }
  }
}
