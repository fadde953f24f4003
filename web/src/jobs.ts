// The user's jobs, live: one onSnapshot per media collection (generations/{uid}/images and .../videos; the rules
// let a user read only their own), rendered as a list that is updated in place so a playing video keeps playing.
import { collection, limit, onSnapshot, orderBy, query, type Firestore, type Unsubscribe } from "firebase/firestore";
import { FINAL_STATES, REQUEST_SCHEMA, type JobDoc, type MediaType, type Timestamp } from "./contract.gen";
import { RETRY_NOTE } from "./errors";
import { fieldOf } from "./form";

export interface Job {
  id: string;
  media: MediaType;
  /** What the card shows of the doc: each field it reads of the type it reads (`readable`). */
  doc: JobDoc;
  /** The doc as written, whatever its values: a job's request again is read from it (and checked by the contract). */
  written: Record<string, unknown>;
  /** A write of this tab's to the doc the server has not acknowledged yet (offline: a queued doc not sent). */
  sending?: boolean;
}

/** What a card's buttons do; each is given the job as last listed. `retry` resolves to its error, if any. */
export interface CardHandlers {
  /** Resolves to what the card says of a failure, as `remove` does. */
  cancel: (job: Job) => Promise<string | null>;
  edit: (job: Job) => void;
  retry: (job: Job) => Promise<string | null>;
  dismiss: (job: Job) => void;
  /** Deletes a finished job (deleteGeneration), once the user confirms; resolves to what the card says of a failure. */
  remove: (job: Job) => Promise<string | null>;
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
  return nameFor(job.media, job.doc.prompt);
}

/** A job as the page names it before its card exists (the form's line about a request it sent). */
export function nameFor(media: MediaType, prompt: string | undefined): string {
  return `${media === "videos" ? "video" : "image"} ${quoted({ prompt })}`;
}

export function capital(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

const MEDIA: MediaType[] = ["images", "videos"];

/** How many of each media type's newest jobs are listed at first, and how many more each "Show older jobs" adds:
 * a user's month of history was read whole (a read billed per doc) and rendered whole at every page open. */
export const PAGE = 50;

/** The newest `count` jobs of each media type, live, said once both collections have answered (before that, no
 * job listed may only mean none has arrived; and a wider listener's first answer, of one type alone, would take
 * the other's cards away a moment). `more`: older jobs exist beyond those listed. A job's doc without
 * `created_at` is not listed (every flow of the contract writes one: the rules require it of clients, runsync and
 * the callable write it; an admin's doc without one is outside the ordered query). */
export function listenToJobs(
  db: Firestore,
  uid: string,
  count: number,
  onJobs: (jobs: Job[], cached: boolean, more: boolean) => void,
  onError: (e: Error) => void,
): Unsubscribe {
  const byMedia = new Map<MediaType, Job[]>();
  const cachedMedia = new Set<MediaType>();
  let failed = false;
  // A listener that failed (the rules refused it, its user's token revoked) is over: the error is said once, for
  // the page to listen again, and the other one's news is none until then. (Stopped here at once, before its own
  // error came, the other query listened to again answered nothing: the SDK's quirk, seen on the emulator.)
  const fail = (error: Error) => {
    if (failed) return;
    failed = true;
    onError(error);
  };
  const stops: Unsubscribe[] = [];
  const stop = () => stops.forEach((unsubscribe) => unsubscribe());
  for (const media of MEDIA) {
    const unsubscribe = onSnapshot(
      query(collection(db, "generations", uid, media), orderBy("created_at", "desc"), limit(count)),
      // Metadata changes too: a listener that loses the server says so (`fromCache`), with no change of its docs.
      { includeMetadataChanges: true },
      (snapshot) => {
        if (failed) return;
        if (snapshot.metadata.fromCache) cachedMedia.add(media);
        else cachedMedia.delete(media);
        // "estimate": a job just written shows its local time until the server's timestamp arrives.
        byMedia.set(
          media,
          snapshot.docs.map((d) => {
            const written = d.data({ serverTimestamps: "estimate" });
            return { id: d.id, media, doc: readable(written), written, sending: d.metadata.hasPendingWrites };
          }),
        );
        if (byMedia.size < MEDIA.length) return;
        const { jobs, more } = newest([...byMedia.values()], count);
        onJobs(jobs, cachedMedia.size > 0, more);
      },
      fail,
    );
    stops.push(unsubscribe);
  }
  return stop;
}

/** Each media type's newest `count`, merged newest first and cut where a full one ends: past that point its
 * older jobs are not known, and another type's listed there would leave a gap in the history. */
export function newest(byMedia: Job[][], count: number): { jobs: Job[]; more: boolean } {
  const full = byMedia.filter((jobs) => jobs.length >= count);
  const boundary = Math.max(-Infinity, ...full.map((jobs) => Math.min(...jobs.map((job) => millis(job.doc.created_at)))));
  const jobs = byMedia
    .flat()
    .filter((job) => millis(job.doc.created_at) >= boundary)
    .sort((a, b) => millis(b.doc.created_at) - millis(a.doc.created_at));
  return { jobs, more: full.length > 0 };
}

function millis(t: Timestamp | undefined): number {
  return t ? t.seconds * 1000 + t.nanoseconds / 1e6 : Number.MAX_SAFE_INTEGER;
}

/** A value as text: a string as it is, a number or a boolean as it reads; anything else is none. */
function text(value: unknown): string | undefined {
  if (typeof value === "string") return value;
  return typeof value === "number" || typeof value === "boolean" ? String(value) : undefined;
}

function finite(value: unknown): number | undefined {
  return typeof value === "number" && Number.isFinite(value) ? value : undefined;
}

function oneOf<T extends string>(value: unknown): T | undefined {
  return typeof value === "string" ? (value as T) : undefined;
}

/** A job's doc as its card reads it. A doc is written by clients too: the rules accept any scalar in a request
 * field (the worker then fails the job, "prompt must be a string"), and the Admin SDK anything (audit: a prompt
 * of 123 threw in the list's rendering, and no later job was ever listed). Each field the page reads keeps a value
 * of its type, a text field a scalar as text; any other value is left out, as if the doc did not hold it. */
function readable(data: Record<string, unknown>): JobDoc {
  const status = typeof data.status === "string" ? data.status : "unknown";
  const urls = (value: unknown) => (Array.isArray(value) ? value.filter((url): url is string => typeof url === "string") : undefined);
  const time = (value: unknown) =>
    typeof value === "object" && value !== null && finite((value as Timestamp).seconds) !== undefined
      ? ({ seconds: (value as Timestamp).seconds, nanoseconds: finite((value as Timestamp).nanoseconds) ?? 0 } as Timestamp)
      : undefined;
  const info = data.video_info as Record<string, unknown> | null | undefined;
  const numbers = ["frames", "fps", "duration_seconds", "width", "height"] as const;
  const doc: Record<string, unknown> = {
    status,
    created_at: time(data.created_at),
    prompt: text(data.prompt),
    error_message: text(data.error_message),
    error_type: oneOf(data.error_type),
    seed: finite(data.seed),
    progress: finite(data.progress) === undefined ? undefined : Math.min(1, Math.max(0, data.progress as number)),
    queue_seconds: finite(data.queue_seconds),
    generation_seconds: finite(data.generation_seconds),
    upload_seconds: finite(data.upload_seconds),
    dispatched_by: oneOf(data.dispatched_by),
    attempts: finite(data.attempts),
    cancel_requested: data.cancel_requested === true,
    prompt_truncated: data.prompt_truncated === true ? true : undefined,
    width: finite(data.width),
    height: finite(data.height),
    images: urls(data.images),
    image_url: oneOf(data.image_url),
    videos: urls(data.videos),
    video_url: oneOf(data.video_url),
    // Its caption and size only where each of its numbers is one.
    video_info:
      typeof info === "object" && info !== null && numbers.every((name) => finite(info[name]) !== undefined)
        ? Object.fromEntries(numbers.map((name) => [name, info[name]]))
        : undefined,
  };
  for (const [name, value] of Object.entries(doc)) if (value === undefined) delete doc[name];
  return doc as unknown as JobDoc;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, props: Partial<HTMLElementTagNameMap[K]> = {}, ...children: (Node | string)[]) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

/** A duration as people read it (an audit: a job an hour in the queue read "Queued 3725.4 s"). */
function seconds(value: number | undefined): string | null {
  if (value === undefined) return null;
  if (value < 60) return `${value.toFixed(1)} s`;
  const whole = Math.round(value);
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
  return `${Math.floor(whole / 3600)} h ${Math.floor((whole % 3600) / 60)} min`;
}

type Parameter =
  | "num_inference_steps"
  | "guidance_scale"
  | "video_guidance_scale"
  | "width"
  | "height"
  | "num_images_per_prompt"
  | "video_width"
  | "video_height"
  | "num_frames";

/** A request parameter of the job's doc (either spelling), as the job runs it: the doc's number, else, on a job that
 * runs or ran, the contract's default; none where the doc holds something else, or on a failed job (a refused
 * job's may hold anything). */
function parameter(job: Job, name: Parameter): number | null {
  const value = finite(fieldOf(job.written, name));
  if (value !== undefined) return value;
  return job.doc.status !== "failed" && fieldOf(job.written, name) == null ? REQUEST_SCHEMA.properties[name].default : null;
}

/** A guidance as the form's hint gives it: one decimal at least ("5.0", "7.5", "7.25"). */
function guidance(value: number | null): string | null {
  return value === null ? null : Number.isInteger(value) ? value.toFixed(1) : String(value);
}

/** What the job makes: its size, and its image count or frames (an audit: a card never said its size). */
function size(job: Job): string | null {
  const videos = job.media === "videos";
  const [width, height] = videos
    ? [parameter(job, "video_width"), parameter(job, "video_height")]
    : [parameter(job, "width"), parameter(job, "height")];
  if (width === null || height === null) return null;
  const count = parameter(job, videos ? "num_frames" : "num_images_per_prompt");
  const more = count === null || (!videos && count === 1) ? "" : `, ${count} ${videos ? "frames" : "images"}`;
  return `${width}×${height}${more}`;
}

const WHEN = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

/** When the job was made, in the reader's time zone (an audit: a long history said nothing of when each job was). */
function created(doc: JobDoc): HTMLTimeElement | null {
  if (!doc.created_at) return null;
  const date = new Date(millis(doc.created_at));
  if (Number.isNaN(date.getTime())) return null; // an admin's map past a Date's range: no time to say
  return el("time", { dateTime: date.toISOString(), textContent: WHEN.format(date) });
}

/** What the card's facts show of its request: a request restated while queued (its runsync after its placeholder
 * doc) changes them, its status not. */
function facts(job: Job): string {
  const guidance = job.media === "videos" ? "video_guidance_scale" : "guidance_scale";
  return `${size(job)}|${parameter(job, "num_inference_steps")}|${parameter(job, guidance)}`;
}

/** The facts under a job: when it was made, its size, seed, steps and guidance, timings, who dispatched it. */
function details(job: Job): HTMLDListElement {
  const { doc } = job;
  const steps = parameter(job, "num_inference_steps");
  const rows: [string, string | Node | null][] = [
    ["Created", created(doc)],
    ["Size", size(job)],
    ["Seed", doc.seed === undefined || doc.seed === null ? null : String(doc.seed)],
    ["Steps", steps === null ? null : String(steps)],
    ["Guidance", guidance(parameter(job, job.media === "videos" ? "video_guidance_scale" : "guidance_scale"))],
    ["Queued", seconds(doc.queue_seconds)],
    ["Generation", seconds(doc.generation_seconds)],
    ["Upload", seconds(doc.upload_seconds)],
    ["Dispatched by", doc.dispatched_by ?? null],
  ];
  const dl = el("dl");
  for (const [name, value] of rows) {
    if (value !== null) dl.append(el("div", {}, el("dt", { textContent: name }), el("dd", {}, value)));
  }
  return dl;
}

function gallery(job: Job): HTMLElement {
  const { doc } = job;
  const box = el("div", { className: "gallery" });
  const urls = mediaUrls(job);
  // Named by the prompt clipped, as the card's controls are: the whole prompt (up to 2,000 characters) was read out
  // again for each result (the review).
  const label = (what: string, i: number) => `${what} ${i + 1} of ${urls.length}: ${quoted(doc)}`;
  if (job.media === "videos") {
    const info = doc.video_info;
    urls.forEach((url, i) => {
      // "metadata": its size, length and first frame; the rest when played. A user's month of videos, each several
      // MB at full size, was all fetched whenever the page opened. Safari on iOS shows no frame for "metadata"
      // alone (a blank box until played): a media fragment's start, a millisecond in, has it fetch and show one.
      const src = `${url}#t=${FIRST_FRAME_AT}`;
      const video = el("video", { src, controls: true, preload: "metadata", muted: true, loop: true, playsInline: true });
      video.setAttribute("aria-label", label("Video", i));
      if (info) Object.assign(video, { width: info.width, height: info.height });
      const caption = info ? `${info.frames} frames at ${info.fps} fps, ${seconds(info.duration_seconds)} ` : "";
      const open = link(url, `Open video ${i + 1}`, `Open ${label("video", i)}`);
      box.append(figure(video, `Video ${i + 1}`, el("figcaption", {}, caption, open)));
    });
  } else {
    urls.forEach((url, i) => {
      // Lazy: the images of a long history are fetched as they are scrolled near, not all as the page opens.
      const img = el("img", { src: url, alt: label("Image", i), decoding: "async", loading: "lazy" });
      if (doc.width && doc.height) Object.assign(img, { width: doc.width, height: doc.height });
      const open = link(url, `Open image ${i + 1}`, `Open ${label("image", i)}`);
      box.append(figure(img, `Image ${i + 1}`, el("figcaption", {}, open)));
    });
  }
  box.dataset.urls = urls.join(" ");
  return box;
}

/** A result's URLs, as the gallery shows them. */
function mediaUrls({ media, doc }: Job): string[] {
  if (media === "videos") return doc.videos ?? (doc.video_url ? [doc.video_url] : []);
  return doc.images ?? (doc.image_url ? [doc.image_url] : []);
}

/** A result that cannot be loaded says so in place of a blank frame or a broken image (the review: a signed URL
 * expires after 7 days at most, a doc lives RETENTION_DAYS; an object may have been deleted), its dead link gone. */
function figure(media: HTMLImageElement | HTMLVideoElement, what: string, caption: HTMLElement): HTMLElement {
  const gone = el("p", {
    className: "gone",
    textContent: `${what} could not be loaded: its link may have expired, or the file was deleted`,
    hidden: true,
  });
  media.addEventListener("error", () => {
    media.hidden = caption.hidden = true;
    gone.hidden = false;
  });
  return el("figure", {}, media, caption, gone);
}

/** A result full size, in a tab of its own, to save from there: the bucket's host is another origin, whose files a
 * `download` link cannot save (an audit: "Download image 1" opened a tab all the same). */
/** `name`: what a screen reader's list of links says, the job's prompt in it (the web app review: every card's were
 * "Open image 1"); it starts with the visible `text`, which speech input users say. */
function link(url: string, text: string, name: string): HTMLAnchorElement {
  const a = el("a", { href: url, textContent: text, target: "_blank", rel: "noopener" });
  a.setAttribute("aria-label", name);
  return a;
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
    try {
      update(li, job);
      li.hidden = hidden(job);
      if (known && before !== li.dataset.phase) said.push(news(job, li.dataset.phase!));
    } catch (error) {
      // What no one foresaw: this card shows what it could, and every other card is listed and updated all the
      // same (audit: one doc's error stopped the whole list for good).
      console.error(`firegen: the card of ${keyOf(job)} could not be shown in full`, error);
    }
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

/** The page's title with how many of the jobs listed are under way (queued or processing), `(2) firegen`: what a
 * tab in the background shows of a video that renders for minutes. */
export function titled(base: string, jobs: Job[]): string {
  const under = jobs.filter((job) => job.doc.status === "queued" || job.doc.status === "processing").length;
  return under ? `(${under}) ${base}` : base;
}

/** A job's phase as the page shows it: its status, but "cancelled" for a job that failed for its user's cancel, and
 * "refused" for one its user's limits refused before it ever ran: no failure of the job's, to alarm them with (a web
 * review: each press past USER_MAX_PENDING left a red "failed" card). */
function phase(doc: JobDoc): string {
  if (doc.status !== "failed") return doc.status;
  if (doc.error_type === "Cancelled") return "cancelled";
  return doc.error_type === "QuotaExceeded" && !((doc.attempts ?? 0) > 0) ? "refused" : "failed";
}

const PHASE_NEWS: Record<string, string> = {
  queued: "queued",
  processing: "started",
  completed: "completed",
  failed: "failed",
  cancelled: "cancelled",
  refused: "refused",
};

function news(job: Job, now: string): string {
  const what = `${kindOf(job)} ${quoted(job.doc)} ${PHASE_NEWS[now] ?? now}`;
  return now === "failed" || now === "refused" ? `${what}: ${job.doc.error_message ?? "Generation failed"}` : what;
}

function kindOf(job: Job): string {
  return job.media === "videos" ? "Video" : "Image";
}

/** The prompt, clipped, in quotes: what names a job to a screen reader (its id is a UUID, no name to hear). Without
 * its explicit direction controls: in a sentence (a confirm, the news) a U+202E turned the rest of it around (the
 * unicode review: "Delete image “a cat.enodnu eb tonnac sihT ?selif sti dna ”foor a no"). */
function quoted(doc: Pick<JobDoc, "prompt">): string {
  return `“${clip(promptOf(doc).replace(DIRECTION_CONTROLS, ""), NAME_CHARS)}”`;
}

const DIRECTION_CONTROLS = /[\u202a-\u202e\u2066-\u2069]/g;

/** A refused request's doc may hold a blank prompt (refused for it: "prompt is required"), or none. */
function promptOf(doc: Pick<JobDoc, "prompt">): string {
  return doc.prompt?.trim() ? doc.prompt : "(no prompt recorded)";
}

/** Clipped between graphemes, what a reader sees as characters (audit: clipped by code points, a family emoji,
 * five of them joined, was cut in a button's name). */
const GRAPHEMES = typeof Intl.Segmenter === "function" ? new Intl.Segmenter(undefined, { granularity: "grapheme" }) : null;

/** A text's graphemes, or where the browser has no Intl.Segmenter (Firefox before 125), its code points: a joined
 * emoji may then be cut, the page still runs (the review: the whole bundle failed at this line). */
function graphemes(text: string): Iterable<string> {
  return GRAPHEMES ? Array.from(GRAPHEMES.segment(text), ({ segment }) => segment) : Array.from(text);
}

function clip(text: string, most: number): string {
  const kept: string[] = [];
  for (const segment of graphemes(text)) {
    if (kept.length === most) return `${kept.slice(0, most - 1).join("")}…`;
    kept.push(segment);
  }
  return text;
}

/** How much of a prompt goes into a control's accessible name and into the news. */
const NAME_CHARS = 60;

/** The job each card shows, as last listed (its buttons act on that). */
const shown = new WeakMap<HTMLLIElement, Job>();

/** How long a Try again refuses presses at least, and every other Try again with it: a double click acts once,
 * whatever the list does meanwhile (audit: a queued doc's write took tens of ms, and a second press 150-400 ms
 * later sent a second job; and the new job's card goes on top, so the list moves under the pointer and the second
 * click of a double click landed on the next card's Try again). A Dismiss likewise keeps the other cards' buttons
 * from acting for as long. */
export const QUIET_MS = 1000;

/** Until when (performance.now()) the last Try again or Dismiss pressed keeps the list's buttons from acting, and
 * its card (a dismissed card goes, and the one below moves up under the pointer: a double click's second click
 * would dismiss it, or press whatever of it is there). */
let quiet = { until: -Infinity, card: null as HTMLLIElement | null };

/** Whether a press on `li`'s buttons is the stray second click of a double click on another card's Try again. */
function stray(li: HTMLLIElement): boolean {
  return performance.now() < quiet.until && quiet.card !== li;
}

/** Whether a card's button refuses presses (aria-disabled, not disabled: that would drop the keyboard's focus to
 * <body>). A Try again while its request is sent, and every Try again for QUIET_MS after one was pressed; a Cancel
 * while its call is under way and once asked; and any other card's button for QUIET_MS after a Try again (the new job's card, on top, may be under
 * the pointer: its Cancel would stop the job just sent) or a Dismiss. */
function refusing(button: HTMLButtonElement): boolean {
  if (button.classList.contains("retry")) return button.dataset.sending === "true" || performance.now() < quiet.until;
  return button.dataset.sending === "true" || button.dataset.asked === "true" || stray(button.closest("li")!);
}

/** Mark the refusals of the buttons of the cards under `root` (the page, or a card). */
function showRefusals(root: ParentNode = document): void {
  for (const button of root.querySelectorAll<HTMLButtonElement>(".job button")) {
    if (refusing(button)) button.setAttribute("aria-disabled", "true");
    else button.removeAttribute("aria-disabled");
  }
}

/** A press on `li`'s Try again or Dismiss: for QUIET_MS, the other cards' buttons (and every Try again) refuse. */
function quieten(li: HTMLLIElement): void {
  quiet = { until: performance.now() + QUIET_MS, card: li };
  showRefusals();
  // A little past the end, so the clock has surely passed it.
  setTimeout(showRefusals, QUIET_MS + 20);
}

/** A press on `li`'s `button` runs `act`, unless the button refuses it; the button refuses presses until `act` ends.
 * `quietens`: a Try again's, which keeps the other cards' buttons from acting for QUIET_MS too (`quieten`). */
function onPress(button: HTMLButtonElement, li: HTMLLIElement, act: () => Promise<unknown>, quietens = false): void {
  button.addEventListener("click", async () => {
    if (refusing(button)) return;
    button.dataset.sending = "true";
    if (quietens) quieten(li);
    else showRefusals(li);
    try {
      await act();
    } finally {
      delete button.dataset.sending;
      showRefusals(quietens ? document : li);
    }
  });
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
  // Each button acts on the job as last listed (its prompt, which the lines name it by, may have changed since).
  const latest = () => shown.get(li) ?? job;
  const cancel = el("button", { type: "button", className: "cancel", textContent: "Cancel" });
  // What a cancel, a try again or a delete met is said beside the card too: the form's lines, where the page says
  // it aloud, may be far above the card (a screen away on a phone).
  const note = el("p", { className: "note" });
  /** What the call met, beside the card. */
  const noted = async (call: (job: Job) => Promise<string | null>, prefix = "") => {
    note.textContent = "";
    const met = await call(latest());
    note.textContent = met ? prefix + met : "";
  };
  // Once asked, the button refuses presses (`refusing`).
  // Refused while its call is under way too (a double click asked twice), and again once the doc says it was asked.
  onPress(cancel, li, () => noted(handlers.cancel));
  // An ended job's buttons (update() shows those its state allows).
  const retry = el("button", { type: "button", className: "retry", textContent: "Try again" });
  onPress(retry, li, () => noted(handlers.retry, RETRY_NOTE), true);
  const edit = el("button", { type: "button", className: "edit", textContent: "Edit as new" });
  edit.addEventListener("click", () => refusing(edit) || handlers.edit(latest()));
  const dismiss = el("button", { type: "button", className: "dismiss", textContent: "Dismiss" });
  dismiss.addEventListener("click", () => {
    if (refusing(dismiss)) return;
    quieten(li);
    handlers.dismiss(latest());
  });
  // Its card goes once the listener hears the doc is gone; until the call ends it refuses presses.
  const remove = el("button", { type: "button", className: "delete", textContent: "Delete" });
  onPress(remove, li, () => noted(handlers.remove));
  const actions = el("div", { className: "actions" }, edit, retry, dismiss, remove);
  // The rest of a clipped prompt, on demand (update() shows it where the prompt is clipped): in a title's tooltip
  // it was out of reach of touch and the keyboard (the review).
  // dir=auto: a prompt in Arabic or Hebrew reads right to left, isolated from the text around it.
  const full = el("details", { className: "full-prompt", hidden: true }, el("summary", { textContent: "Full prompt" }), el("p", { dir: "auto" }));
  li.append(
    el("h3", {}, `${kind}: `, el("span", { className: "prompt", dir: "auto" })),
    full,
    el("div", { className: "state" }, el("span", { className: "status" }), bar, el("span", { className: "percent" }), cancel),
    actions,
    note,
    el("dl"),
  );
  return li;
}

/** A completed job's `prompt_truncated`: its text encoder took the start of the prompt alone, and said so only in
 * a log line. */
const CUT: Record<MediaType, string> = {
  images: "The model read only the start of this prompt (77 tokens, about 60 English words): shorten it to use it all",
  videos: "The model read only the start of this prompt (512 tokens): shorten it to use it all",
};

/** Where a card's video is first shown (a media fragment's start, in seconds: see `gallery`). */
const FIRST_FRAME_AT = 0.001;

/** Longer prompts are clipped in the card (a prompt may have 2,000 characters); its Full prompt shows the whole. */
const PROMPT_SHOWN = 200;

function update(li: HTMLLIElement, job: Job): void {
  shown.set(li, job);
  const { doc } = job;
  const final = (FINAL_STATES as readonly string[]).includes(doc.status);
  const progress = doc.status === "completed" ? 1 : (doc.progress ?? 0);
  const state = `${doc.status}|${mediaUrls(job).join(" ")}|${progress}|${doc.error_type ?? ""}|${doc.error_message ?? ""}|${doc.prompt ?? ""}|${doc.seed ?? ""}|${doc.generation_seconds ?? ""}|${doc.dispatched_by ?? ""}|${doc.cancel_requested ?? ""}|${doc.prompt_truncated ?? ""}|${millis(doc.created_at)}|${facts(job)}`;
  if (li.dataset.state === state) return;
  li.dataset.state = state;
  li.dataset.status = doc.status;

  const kind = kindOf(job).toLowerCase();
  const prompt = li.querySelector<HTMLElement>(".prompt")!;
  const text = promptOf(doc);
  prompt.textContent = clip(text, PROMPT_SHOWN);
  const full = li.querySelector<HTMLDetailsElement>("details.full-prompt")!;
  const summary = full.querySelector("summary")!;
  const whole = prompt.textContent === text ? "" : text;
  // Written only when it changes: an open one keeps its place and its text's selection through progress writes.
  if (full.querySelector("p")!.textContent !== whole) full.querySelector("p")!.textContent = whole;
  summary.setAttribute("aria-label", `Full prompt of ${kind} ${quoted(doc)}`);
  if (!whole && document.activeElement === summary) {
    li.tabIndex = -1;
    li.focus();
  }
  full.hidden = !whole;
  const before = li.dataset.phase;
  li.dataset.phase = phase(doc);
  // What a button met is old news once the job moves on (it runs again, or ends), not at each of its progress
  // writes (a cancel's failure went with the job's next percent, a second later).
  if (li.dataset.phase !== before) li.querySelector(".note")!.textContent = "";
  // A cancel asked of a live job: it ends at its worker's next step, which on a slow card may be a while (audit:
  // "Processing 0%" for a minute after Cancel, nothing on the card said so).
  // A queued job's empty bar and 0% read as a job stuck at its start (an audit): it says it waits instead. One this
  // tab wrote, not yet at the server (offline, it waits in the tab), says so: it is not queued anywhere yet (a web
  // review: "queued, waiting its turn"). Its Cancel stays where it is: one that came only with the server's answer,
  // a moment later online, would come under a pointer there.
  const queued = doc.status === "queued";
  const sending = queued && job.sending === true;
  li.querySelector(".status")!.textContent =
    !final && doc.cancel_requested
      ? "cancelling…"
      : sending
        ? "sending…"
        : queued
          ? "queued, waiting its turn"
          : li.dataset.phase;
  const bar = li.querySelector("progress")!;
  bar.value = progress;
  bar.setAttribute("aria-label", `Progress of ${kind} ${quoted(doc)}`);
  // At 100% the worker still encodes and uploads the result (the job is not completed yet, and can be cancelled).
  const finishing = doc.status === "processing" && progress >= 1;
  const percent = li.querySelector<HTMLElement>(".percent")!;
  percent.textContent = `${Math.round(progress * 100)}%${finishing && !doc.cancel_requested ? ", finishing…" : ""}`;
  // An ended job's status says it all: a failed job's empty bar and 0% only read as a job stuck at the start.
  bar.hidden = percent.hidden = final || queued;
  // Hidden, not removed, once the job ends: a job refused for its user's limits and sent again runs once more.
  // Likewise an ended job's buttons, while it runs again.
  const cancel = li.querySelector<HTMLButtonElement>("button.cancel")!;
  const buttons: [HTMLButtonElement, string, boolean][] = [
    [cancel, "Cancel", !final],
    [li.querySelector<HTMLButtonElement>("button.edit")!, "Edit as new", final],
    [li.querySelector<HTMLButtonElement>("button.retry")!, "Try again", doc.status === "failed" && !refusedForInput(doc)],
    [li.querySelector<HTMLButtonElement>("button.dismiss")!, "Dismiss", dismissable(job)],
    [li.querySelector<HTMLButtonElement>("button.delete")!, "Delete", final],
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
  if (doc.cancel_requested) cancel.dataset.asked = "true";
  else delete cancel.dataset.asked;
  showRefusals(li);
  li.querySelector("p.error")?.remove();
  delete li.dataset.errorType;
  if (doc.status === "failed") {
    li.querySelector(".state")!.after(el("p", { className: "error", textContent: doc.error_message ?? "Generation failed" }));
    if (doc.error_type) li.dataset.errorType = doc.error_type;
  }
  li.querySelector("p.cut")?.remove();
  if (doc.status === "completed" && doc.prompt_truncated === true) {
    li.querySelector(".state")!.after(el("p", { className: "cut", textContent: CUT[job.media] }));
  }
  li.querySelector("dl")!.replaceWith(details(job));
  // Built once the job has completed, and kept (a video may be playing), unless its URLs change (an app that signs
  // them again as they expire).
  const built = li.querySelector<HTMLElement>(".gallery");
  if (doc.status !== "completed") return;
  if (!built) li.append(gallery(job));
  else if (built.dataset.urls !== mediaUrls(job).join(" ")) built.replaceWith(gallery(job));
}
