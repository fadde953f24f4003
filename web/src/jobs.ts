// The user's jobs, live: one onSnapshot per media collection (generations/{uid}/images and .../videos; the rules
// let a user read only their own), rendered as a list that is updated in place so a playing video keeps playing.
import { collection, onSnapshot, type Firestore, type Unsubscribe } from "firebase/firestore";
import { FINAL_STATES, type JobDoc, type MediaType, type Timestamp } from "./contract.gen";

export interface Job {
  id: string;
  media: MediaType;
  doc: JobDoc;
}

export type CancelHandler = (job: Job) => void;

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
export function renderJobs(list: HTMLOListElement, jobs: Job[], onCancel: CancelHandler): string[] {
  const existing = new Map([...list.children].map((li) => [(li as HTMLElement).dataset.key!, li as HTMLLIElement]));
  const order: HTMLLIElement[] = [];
  const said: string[] = [];
  for (const job of jobs) {
    const key = `${job.media}/${job.id}`;
    const known = existing.get(key);
    const li = known ?? card(job, onCancel);
    const before = known?.dataset.phase;
    update(li, job);
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

/** A job's card, built once: updates change its parts in place, so a focused Cancel button keeps its focus. */
function card(job: Job, onCancel: CancelHandler): HTMLLIElement {
  const li = el("li", { className: "job" });
  li.dataset.key = `${job.media}/${job.id}`;
  li.dataset.fileUid = job.id;
  li.dataset.media = job.media;
  const kind = kindOf(job);
  // Their accessible names (the job's kind and prompt) are set by update(), as the prompt may arrive later.
  const bar = el("progress", { max: 1, value: 0 });
  const cancel = el("button", { type: "button", className: "cancel", textContent: "Cancel" });
  // Only its id and media are read, which never change. Once asked, the button refuses presses but is not
  // disabled: a disabled button would drop the keyboard's focus to <body>.
  cancel.addEventListener("click", () => cancel.getAttribute("aria-disabled") !== "true" && onCancel(job));
  li.append(
    el("h3", {}, `${kind}: `, el("span", { className: "prompt" })),
    el("div", { className: "state" }, el("span", { className: "status" }), bar, el("span", { className: "percent" }), cancel),
    el("dl"),
  );
  return li;
}

/** Longer prompts are clipped in the card (a prompt may have 2,000 characters); the title holds the whole. */
const PROMPT_SHOWN = 200;

function update(li: HTMLLIElement, job: Job): void {
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
  const cancel = li.querySelector<HTMLButtonElement>("button.cancel")!;
  cancel.setAttribute("aria-label", `Cancel ${kind} ${quoted(doc)}`);
  if (final && document.activeElement === cancel) {
    // A focused button that goes would leave the focus on <body>: it stays on the card instead.
    li.tabIndex = -1;
    li.focus();
  }
  cancel.hidden = final;
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
