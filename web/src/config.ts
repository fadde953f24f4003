// Where the app finds its Firebase project: Hosting's /__/firebase/init.json (deployed, and under the Hosting
// emulator; `make dev`'s static server serves the same file). Served from this machine, it also reads
// /firegen-emulators.json, which `make dev` writes beside the page, and talks to the emulators it names.
import type { FirebaseOptions } from "firebase/app";

/** What `make dev` writes (devtools/web.py): host:port of each emulator, or null where it does not run. */
export interface EmulatorConfig {
  auth: string | null;
  firestore: string;
  functions: string | null;
  /** The uid to use where no Auth emulator runs (make dev's fallback): rules are off there. */
  uid?: string;
}

/** What scripts/setup_web.py writes beside the bundle, from its environment at build (deploy) time. */
export interface AppSettings {
  /** FIREGEN_APP_CHECK_SITE_KEY: a reCAPTCHA Enterprise site key; the page then sends App Check tokens. */
  appCheckSiteKey: string | null;
  /** FIREGEN_FUNCTIONS_REGION: where the callables run, if not us-central1 (the SDK's default). */
  functionsRegion?: string | null;
}

export interface AppConfig {
  options: FirebaseOptions;
  emulators: EmulatorConfig | null;
  settings: AppSettings;
}

const LOCAL_HOSTS = new Set(["127.0.0.1", "localhost", "[::1]"]);

/** The code of a start whose configuration the network failed to fetch: a start the network failed, as a sign-in's
 * `auth/network-request-failed` (before: the browser's own "Failed to fetch", and no start again once online). */
export const CONFIG_UNREACHABLE = "config/network-request-failed";

async function getJson<T>(path: string): Promise<T> {
  const response = await fetch(path, { cache: "no-store" }).catch(() => {
    throw Object.assign(new Error(`${path}: no answer`), { code: CONFIG_UNREACHABLE });
  });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return (await response.json()) as T;
}

export async function loadConfig(): Promise<AppConfig> {
  const options = await getJson<FirebaseOptions>("/__/firebase/init.json");
  const local = LOCAL_HOSTS.has(location.hostname);
  const emulators = local ? await getJson<EmulatorConfig>("/firegen-emulators.json") : null;
  const settings = await getJson<AppSettings>("/firegen-app.json");
  return { options, emulators, settings };
}

/** "127.0.0.1:8080" → ["127.0.0.1", 8080] */
export function hostPort(address: string): [string, number] {
  const at = address.lastIndexOf(":");
  return [address.slice(0, at), Number(address.slice(at + 1))];
}
