// The user's jobs, live: one onSnapshot per media collection (generations/{uid}/images and .../videos; the rules
// let a user read only their own), rendered as a list that is updated in place so a playing video keeps playing.
import { collection, onSnapshot, type Firestore, type Unsubscribe } from "firebase/firestore";
import { FINAL_STATES, type JobDoc, type MediaType, type Timestamp } from "./contract.gen";

export interface Job {
  id: string;
  media: MediaType;
  doc: JobDoc;
}

/** What a card's buttons do; each is given the job as last listed. `retry` resolves to its error, if any. */
export interface CardHandlers {
  cancel: (job: Job) => void;
  edit: (job: Job) => void;
  retry: (job: Job) => Promise<string | null>;
  dismiss: (job: Job) => void;
}

/** A job's key in the list (and among the dismissed): one file_uid may name an image and a video. */
export function keyOf(job: Job): string {
  return `${job.media}/${job.id}`;
}

/** Failed and cancelled jobs may be dismissed; a queued, processing or completed one is always listed. */
export function dismissable(job: Job): boolean {
  return job.doc.status === "failed";
}

/** A job refused for its parameters: sending it again as it was would be refused again. */
function refusedForInput(doc: JobDoc): boolean {
  return doc.status === "failed" && doc.error_type === "ValidationError";
}

/** The job's kind and prompt, as its controls are named: `video “waves on a beach”`. */
export function named(job: Job): string {
  return `${kindOf(job).toLowerCase()} ${quoted(job.doc)}`;
}

const MEDIA: MediaType[] = ["images", "videos"];

/** `loaded`: both collections have answered once (before that, no job listed may only mean none has arrived). */
export function listenToJobs(
  db: Firestore,
  uid: string,
  onJobs: (jobs: Job[], loaded: boolean, cached: boolean) => void,
  onError: (e: Error) => void,
): Unsubscribe {
  const byMedia = new Map<MediaType, Job[]>();
  const cachedMedia = new Set<MediaType>();
  const stops = MEDIA.map((media) =>
    onSnapshot(
      collection(db, "generations", uid, media),
      // Metadata changes too: a listener that loses the server says so (`fromCache`), with no change of its docs.
      { includeMetadataChanges: true },
      (snapshot) => {
        if (snapshot.metadata.fromCache) cachedMedia.add(media);
        else cachedMedia.delete(media);
        // "estimate": a job just written shows its local time until the server's timestamp arrives.
        byMedia.set(
          media,
          snapshot.docs.map((d) => ({ id: d.id, media, doc: d.data({ serverTimestamps: "estimate" }) as JobDoc })),
        );
        const jobs = [...byMedia.values()].flat().sort((a, b) => millis(b.doc.created_at) - millis(a.doc.created_at));
        onJobs(jobs, byMedia.size === MEDIA.length, cachedMedia.size > 0);
      },
      onError,
    ),
  );
  return () => stops.forEach((stop) => stop());
}

function millis(t: Timestamp | undefined): number {
  return t ? t.seconds * 1000 + t.nanoseconds / 1e6 : Number.MAX_SAFE_INTEGER;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<HTMLElementTagNameMap[K]> = {}, ...children: (Node | string)[]) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function seconds(value: number | undefined): string | null {
  return value === undefined ? null : `${value.toFixed(1)} s`;
}

/** The facts under a job: seed, timings, who dispatched it. */
function details(doc: JobDoc): HTMLDListElement {
  const rows: [string, string | null][] = [
    ["Seed", doc.seed === undefined || doc.seed === null ? null : String(doc.seed)],
    ["Queued", seconds(doc.queue_seconds)],
    ["Generation", seconds(doc.generation_seconds)],
    ["Upload", seconds(doc.upload_seconds)],
    ["Dispatched by", doc.dispatched_by ?? null],
  ];
  const dl = el("dl");
  for (const [name, value] of rows) {
    if (value !== null) dl.append(el("div", {}, el("dt", { textContent: name }), el("dd", { textContent: value })));
  }
  return dl;
}

function gallery(job: Job): HTMLElement {
  const { doc } = job;
  const box = el("div", { className: "gallery" });
  if (job.media === "videos") {
    const info = doc.video_info;
    (doc.videos ?? (doc.video_url ? [doc.video_url] : [])).forEach((url, i) => {
      const video = el("video", { src: url, controls: true, preload: "auto", muted: true, loop: true, playsInline: true });
      video.setAttribute("aria-label", `Video ${i + 1}: ${doc.prompt ?? ""}`);
      if (info) Object.assign(video, { width: info.width, height: info.height });
      const caption = info ? `${info.frames} frames at ${info.fps} fps, ${info.duration_seconds} s ` : "";
      box.append(el("figure", {}, video, el("figcaption", {}, caption, link(url, `Download video ${i + 1}`))));
    });
  } else {
    (doc.images ?? (doc.image_url ? [doc.image_url] : [])).forEach((url, i) => {
      const img = el("img", { src: url, alt: `Image ${i + 1}: ${doc.prompt ?? ""}`, decoding: "async" });
      if (doc.width && doc.height) Object.assign(img, { width: doc.width, height: doc.height });
      box.append(el("figure", {}, img, el("figcaption", {}, link(url, `Download image ${i + 1}`))));
    });
  }
  return box;
}

function link(url: string, text: string): HTMLAnchorElement {
  return el("a", { href: url, textContent: text, download: "", target: "_blank", rel: "noopener" });
}

/** Create or update the list item of each job; media elements are built once, when the job completes. Returns
 * what to tell screen readers: each job already listed that started, ended or was queued again (a job listed for
 * the first time, as on a reload, is no news; a percent never is). */
export function renderJobs(
  list: HTMLOListElement,
  jobs: Job[],
  handlers: CardHandlers,
  hidden: (job: Job) => boolean = () => false,
): string[] {
  const existing = new Map([...list.children].map((li) => [(li as HTMLElement).dataset.key!, li as HTMLLIElement]));
  const order: HTMLLIElement[] = [];
  const said: string[] = [];
  for (const job of jobs) {
    const known = existing.get(keyOf(job));
    const li = known ?? card(job, handlers);
    const before = known?.dataset.phase;
    update(li, job);
    li.hidden = hidden(job);
    if (known && before !== li.dataset.phase) said.push(news(job, li.dataset.phase!));
    order.push(li);
  }
  // Moves the existing nodes, and only those out of place: a playing video is not rebuilt, and a node moved
  // loses its focus.
  order.forEach((li, i) => {
    if (list.children[i] !== li) list.insertBefore(li, list.children[i] ?? null);
  });
  while (list.children.length > order.length) list.lastElementChild!.remove();
  return said;
}

/** A job's phase as the page shows it: its status, but "cancelled" for a job that failed for its user's cancel. */
function phase(doc: JobDoc): string {
  return doc.status === "failed" && doc.error_type === "Cancelled" ? "cancelled" : doc.status;
}

const PHASE_NEWS: Record<string, string> = {
  queued: "queued",
  processing: "started",
  completed: "completed",
  failed: "failed",
  cancelled: "cancelled",
};

function news(job: Job, now: string): string {
  const what = `${kindOf(job)} ${quoted(job.doc)} ${PHASE_NEWS[now] ?? now}`;
  return now === "failed" ? `${what}: ${job.doc.error_message ?? "Generation failed"}` : what;
}

function kindOf(job: Job): string {
  return job.media === "videos" ? "Video" : "Image";
}

/** The prompt, clipped, in quotes: what names a job to a screen reader (its id is a UUID, no name to hear). */
function quoted(doc: JobDoc): string {
  return `“${clip(promptOf(doc), NAME_CHARS)}”`;
}

/** A refused request's doc may hold a blank prompt (refused for it: "prompt is required"), or none. */
function promptOf(doc: JobDoc): string {
  return doc.prompt?.trim() ? doc.prompt : "(no prompt recorded)";
}

function clip(text: string, most: number): string {
  const chars = [...text];
  return chars.length > most ? `${chars.slice(0, most - 1).join("")}…` : text;
}

/** How much of a prompt goes into a control's accessible name and into the news. */
const NAME_CHARS = 60;

/** The job each card shows, as last listed (its buttons act on that). */
const shown = new WeakMap<HTMLLIElement, Job>();

/** A button that refuses presses while `act` runs (aria-disabled, not disabled: that would drop the keyboard's
 * focus to <body>), so a double click acts once. */
function busyButton(className: string, text: string, act: () => Promise<unknown> | void): HTMLButtonElement {
  const button = el("button", { type: "button", className, textContent: text });
  button.addEventListener("click", async () => {
    if (button.getAttribute("aria-disabled") === "true") return;
    button.setAttribute("aria-disabled", "true");
    try {
      await act();
    } finally {
      button.removeAttribute("aria-disabled");
    }
  });
  return button;
}

/** A job's card, built once: updates change its parts in place, so a focused Cancel button keeps its focus. */
function card(job: Job, handlers: CardHandlers): HTMLLIElement {
  const li = el("li", { className: "job" });
  li.dataset.key = keyOf(job);
  li.dataset.fileUid = job.id;
  li.dataset.media = job.media;
  const kind = kindOf(job);
  // Their accessible names (the job's kind and prompt) are set by update(), as the prompt may arrive later.
  const bar = el("progress", { max: 1, value: 0 });
  const cancel = el("button", { type: "button", className: "cancel", textContent: "Cancel" });
  // Only its id and media are read, which never change. Once asked, the button refuses presses but is not
  // disabled: a disabled button would drop the keyboard's focus to <body>.
  cancel.addEventListener("click", () => cancel.getAttribute("aria-disabled") !== "true" && handlers.cancel(job));
  // An ended job's buttons (update() shows those its state allows). What a try again met is said beside it too:
  // the form's line, where the page says it aloud, may be far above the card.
  const note = el("p", { className: "note" });
  const latest = () => shown.get(li) ?? job;
  const retry = busyButton("retry", "Try again", async () => {
    note.textContent = "";
    note.textContent = (await handlers.retry(latest())) ?? "";
  });
  const actions = el(
    "div",
    { className: "actions" },
    el("button", { type: "button", className: "edit", textContent: "Edit as new", onclick: () => handlers.edit(latest()) }),
    retry,
    el("button", { type: "button", className: "dismiss", textContent: "Dismiss", onclick: () => handlers.dismiss(latest()) }),
  );
  li.append(
    el("h3", {}, `${kind}: `, el("span", { className: "prompt" })),
    el("div", { className: "state" }, el("span", { className: "status" }), bar, el("span", { className: "percent" }), cancel),
    actions,
    note,
    el("dl"),
  );
  return li;
}

/** Longer prompts are clipped in the card (a prompt may have 2,000 characters); the title holds the whole. */
const PROMPT_SHOWN = 200;

function update(li: HTMLLIElement, job: Job): void {
  shown.set(li, job);
  const { doc } = job;
  const final = (FINAL_STATES as readonly string[]).includes(doc.status);
  const progress = doc.status === "completed" ? 1 : (doc.progress ?? 0);
  const state = `${doc.status}|${progress}|${doc.error_type ?? ""}|${doc.error_message ?? ""}|${doc.prompt ?? ""}|${doc.seed ?? ""}|${doc.generation_seconds ?? ""}|${doc.dispatched_by ?? ""}|${doc.cancel_requested ?? ""}`;
  if (li.dataset.state === state) return;
  li.dataset.state = state;
  li.dataset.status = doc.status;

  const prompt = li.querySelector<HTMLElement>(".prompt")!;
  const text = promptOf(doc);
  prompt.textContent = clip(text, PROMPT_SHOWN);
  prompt.title = prompt.textContent === text ? "" : text;
  li.dataset.phase = phase(doc);
  li.querySelector(".status")!.textContent = li.dataset.phase;
  const kind = kindOf(job).toLowerCase();
  const bar = li.querySelector("progress")!;
  bar.value = progress;
  bar.setAttribute("aria-label", `Progress of ${kind} ${quoted(doc)}`);
  // At 100% the worker still encodes and uploads the result (the job is not completed yet, and can be cancelled).
  const finishing = doc.status === "processing" && progress >= 1;
  const percent = li.querySelector<HTMLElement>(".percent")!;
  percent.textContent = `${Math.round(progress * 100)}%${finishing ? ", finishing…" : ""}`;
  // An ended job's status says it all: a failed job's empty bar and 0% only read as a job stuck at the start.
  bar.hidden = percent.hidden = final;
  // Hidden, not removed, once the job ends: a job refused for its user's limits and sent again runs once more.
  // Likewise an ended job's buttons, while it runs again.
  const cancel = li.querySelector<HTMLButtonElement>("button.cancel")!;
  const buttons: [HTMLButtonElement, string, boolean][] = [
    [cancel, "Cancel", !final],
    [li.querySelector<HTMLButtonElement>("button.edit")!, "Edit as new", final],
    [li.querySelector<HTMLButtonElement>("button.retry")!, "Try again", doc.status === "failed" && !refusedForInput(doc)],
    [li.querySelector<HTMLButtonElement>("button.dismiss")!, "Dismiss", dismissable(job)],
  ];
  for (const [button, action, shows] of buttons) {
    button.setAttribute("aria-label", `${action} ${kind} ${quoted(doc)}`);
    if (!shows && document.activeElement === button) {
      // A focused button that goes would leave the focus on <body>: it stays on the card instead.
      li.tabIndex = -1;
      li.focus();
    }
    button.hidden = !shows;
  }
  // What a try again met is old news once the job runs again.
  if (!final) li.querySelector(".note")!.textContent = "";
  if (doc.cancel_requested) cancel.setAttribute("aria-disabled", "true");
  else cancel.removeAttribute("aria-disabled");
  li.querySelector("p.error")?.remove();
  delete li.dataset.errorType;
  if (doc.status === "failed") {
    li.querySelector(".state")!.after(el("p", { className: "error", textContent: doc.error_message ?? "Generation failed" }));
    if (doc.error_type) li.dataset.errorType = doc.error_type;
  }
  li.querySelector("dl")!.replaceWith(details(doc));
  // Built once the job has completed, and kept (a video may be playing).
  if (doc.status === "completed" && !li.querySelector(".gallery")) li.append(gallery(job));
}
