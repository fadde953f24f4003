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

export function listenToJobs(db: Firestore, uid: string, onJobs: (jobs: Job[]) => void, onError: (e: Error) => void): Unsubscribe {
  const byMedia = new Map<MediaType, Job[]>();
  const stops = MEDIA.map((media) =>
    onSnapshot(
      collection(db, "generations", uid, media),
      (snapshot) => {
        // "estimate": a job just written shows its local time until the server's timestamp arrives.
        byMedia.set(
          media,
          snapshot.docs.map((d) => ({ id: d.id, media, doc: d.data({ serverTimestamps: "estimate" }) as JobDoc })),
        );
        onJobs([...byMedia.values()].flat().sort((a, b) => millis(b.doc.created_at) - millis(a.doc.created_at)));
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

/** Create or update the list item of each job; media elements are built once, when the job completes. */
export function renderJobs(list: HTMLOListElement, jobs: Job[], onCancel: CancelHandler): void {
  const existing = new Map([...list.children].map((li) => [(li as HTMLElement).dataset.key!, li as HTMLLIElement]));
  const order: HTMLLIElement[] = [];
  for (const job of jobs) {
    const key = `${job.media}/${job.id}`;
    let li = existing.get(key);
    if (!li) {
      li = el("li", { className: "job" });
      li.dataset.key = key;
      li.dataset.fileUid = job.id;
      li.dataset.media = job.media;
    }
    update(li, job, onCancel);
    order.push(li);
  }
  list.replaceChildren(...order); // moves the existing nodes: a playing video is not rebuilt
}

function update(li: HTMLLIElement, job: Job, onCancel: CancelHandler): void {
  const { doc } = job;
  const final = (FINAL_STATES as readonly string[]).includes(doc.status);
  const progress = doc.status === "completed" ? 1 : (doc.progress ?? 0);
  const kind = job.media === "videos" ? "Video" : "Image";
  const state = `${doc.status}|${progress}|${doc.error_message ?? ""}|${doc.seed ?? ""}|${doc.generation_seconds ?? ""}|${doc.dispatched_by ?? ""}|${doc.cancel_requested ?? ""}`;
  if (li.dataset.state === state) return;
  li.dataset.state = state;
  li.dataset.status = doc.status;

  const bar = el("progress", { max: 1, value: progress });
  bar.setAttribute("aria-label", `Progress of ${kind.toLowerCase()} ${job.id}`);
  const row = el("div", { className: "state" }, el("span", { className: "status", textContent: doc.status }), bar,
    el("span", { className: "percent", textContent: `${Math.round(progress * 100)}%` }));
  if (!final) {
    const cancel = el("button", { type: "button", className: "cancel", textContent: "Cancel", disabled: !!doc.cancel_requested });
    cancel.setAttribute("aria-label", `Cancel ${kind.toLowerCase()} ${job.id}`);
    cancel.addEventListener("click", () => onCancel(job));
    row.append(cancel);
  }
  const parts: Node[] = [el("h3", {}, `${kind}: `, el("span", { className: "prompt", textContent: doc.prompt ?? "(no prompt recorded)" })), row];
  if (doc.status === "failed") {
    parts.push(el("p", { className: "error", textContent: doc.error_message ?? "Generation failed" }));
    if (doc.error_type) li.dataset.errorType = doc.error_type;
  }
  parts.push(details(doc));
  // Keep a gallery already shown (a video may be playing); build it once the job has completed.
  const shown = li.querySelector(".gallery");
  if (shown) parts.push(shown);
  else if (doc.status === "completed") parts.push(gallery(job));
  li.replaceChildren(...parts);
}
