// The page's Firebase session: the app (App Check first, where the project uses it), Firestore and the callables
// (the emulators' under `make dev`), and the user, signed in anonymously.
import { initializeApp, type FirebaseApp } from "firebase/app";
import { initializeAppCheck, ReCaptchaEnterpriseProvider } from "firebase/app-check";
import { connectAuthEmulator, getAuth, onAuthStateChanged, signInAnonymously } from "firebase/auth";
import { connectFirestoreEmulator, getFirestore, type Firestore } from "firebase/firestore";
import { connectFunctionsEmulator, getFunctions, type Functions } from "firebase/functions";
import { CONFIG_UNREACHABLE, hostPort, loadConfig, type EmulatorConfig } from "./config";
import { $ } from "./dom";
import { isCode, message } from "./errors";

export interface Session {
  db: Firestore;
  functions: Functions | null;
  uid: string;
  signedIn: boolean; // through Firebase Auth: the callables know who calls
  projectId: string;
}

type User = Pick<Session, "uid" | "signedIn">;

/** The page starts again for another user (an unsent job's leave-page guard stands aside). */
export let reloading = false;

export async function startSession(): Promise<Session> {
  const config = await loadConfig();
  const app = initializeApp(config.options);
  if (config.settings.appCheckSiteKey) {
    // Before any other service: deployed, the callables (and Firestore, once enforced) refuse calls without a
    // token, and each service asks App Check for one from its first request on.
    const provider = new ReCaptchaEnterpriseProvider(config.settings.appCheckSiteKey);
    initializeAppCheck(app, { provider, isTokenAutoRefreshEnabled: true });
  }
  const db = getFirestore(app);
  const emulators = config.emulators;
  let functions: Functions | null = getFunctions(app, config.settings.functionsRegion ?? undefined);
  if (emulators) {
    connectFirestoreEmulator(db, ...hostPort(emulators.firestore));
    if (emulators.functions) connectFunctionsEmulator(functions, ...hostPort(emulators.functions));
    else functions = null;
  }
  const { uid, signedIn } = emulators && !emulators.auth ? localUser(emulators) : await signIn(app, emulators);
  document.body.dataset.uid = uid;
  return { db, functions, uid, signedIn, projectId: config.options.projectId ?? "" };
}

/** make dev's fallback (no Auth or Functions emulator, no rules): a fixed user, job documents only. */
function localUser(emulators: EmulatorConfig): User {
  const uid = emulators.uid ?? "local-user";
  $("who").textContent = `Local user ${uid} (no Auth emulator: jobs are submitted as documents)`;
  (document.querySelector("input[name=via][value=document]") as HTMLInputElement).checked = true;
  (document.querySelector("input[name=via][value=callable]") as HTMLInputElement).disabled = true;
  return { uid, signedIn: false };
}

async function signIn(app: FirebaseApp, emulators: EmulatorConfig | null): Promise<User> {
  const auth = getAuth(app);
  if (emulators?.auth) connectAuthEmulator(auth, `http://${emulators.auth}`, { disableWarnings: true });
  await signInAnonymously(auth);
  const uid = await new Promise<string>((resolve) => onAuthStateChanged(auth, (user) => user && resolve(user.uid)));
  $("who").textContent = `Signed in anonymously as ${uid}`;
  // Signed out later (in another tab, or the account deleted, as apps do with old anonymous users: its token
  // refresh then fails): the page was still the old user's, its listeners refused, its calls unauthenticated
  // (the review). It starts again, signed in anew.
  onAuthStateChanged(auth, (user) => {
    if (user?.uid !== uid) {
      reloading = true;
      location.reload();
    }
  });
  return { uid, signedIn: true };
}

/** The codes of a start the network failed: it starts again once the browser is back online. */
export const NETWORK_FAILED = ["auth/network-request-failed", CONFIG_UNREACHABLE];

/** Why the start failed, for the page's user: the SDK's own text ("Firebase: Error (auth/...)") says little. */
export function startFailure(error: unknown): string {
  if (isCode(error, ...NETWORK_FAILED)) {
    return "could not reach the server; check your connection (the page starts again once it is back)";
  }
  if (isCode(error, "auth/admin-restricted-operation", "auth/operation-not-allowed")) {
    return "anonymous sign-in is not enabled in this Firebase project (Firebase console > Authentication > Sign-in method)";
  }
  return message(error);
}
