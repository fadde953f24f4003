// The form → a GenerationRequest. Ranges, steps and defaults come from the contract's schema
// (contract.gen.ts); the form does not validate: before sending a request, through the callable or as a queued doc,
// the page checks it with validate.ts, which gives the contract's own message.
import { REQUEST_SCHEMA, type GenerationRequest, type MediaType } from "./contract.gen";

type Props = typeof REQUEST_SCHEMA.properties;
type NumericField = {
  [K in keyof Props]: Props[K] extends { type: "integer" | "number" } ? K : never;
}[keyof Props];

/** Form input id → the request field it fills, per media type (size goes to video_width/height for videos). */
const FIELDS: Record<MediaType, Record<string, NumericField>> = {
  images: {
    width: "width",
    height: "height",
    num_inference_steps: "num_inference_steps",
    num_images_per_prompt: "num_images_per_prompt",
    guidance_scale: "guidance_scale",
  },
  videos: {
    width: "video_width",
    height: "video_height",
    num_inference_steps: "num_inference_steps",
    num_frames: "num_frames",
    fps: "fps",
    guidance_scale: "video_guidance_scale",
  },
};

function input(id: string): HTMLInputElement {
  return document.getElementById(id) as HTMLInputElement;
}

export function mediaType(form: HTMLFormElement): MediaType {
  return (new FormData(form).get("media") as MediaType | null) ?? "images";
}

/** Set each number input's min, max, step and placeholder from the schema, for the chosen media type. */
export function applyRanges(form: HTMLFormElement): void {
  const media = mediaType(form);
  for (const [id, field] of Object.entries(FIELDS[media])) {
    const spec: { type: string; minimum: number; maximum: number; default: number; multipleOf?: number } =
      REQUEST_SCHEMA.properties[field];
    // A guidance is any number in its range (the contract's messages write its bounds as 1.0 and 20.0).
    const decimal = spec.type === "number";
    const show = (value: number) => (decimal ? value.toFixed(1) : String(value));
    const element = input(id);
    element.min = String(spec.minimum);
    element.max = String(spec.maximum);
    element.step = decimal ? "0.1" : String(spec.multipleOf ?? 1);
    element.placeholder = show(spec.default);
    describedBy(element, `${id}-range`, true);
    let hint = document.getElementById(`${id}-range`);
    if (!hint) {
      hint = document.createElement("small");
      hint.id = `${id}-range`;
      element.after(hint);
    }
    // The default is in the hint too: the placeholder that shows it goes once the field is filled.
    const step = spec.multipleOf ? `, step ${spec.multipleOf}` : "";
    hint.textContent = `${show(spec.minimum)}–${show(spec.maximum)}${step}, default ${show(spec.default)}`;
  }
  for (const box of form.querySelectorAll<HTMLElement>("[data-for]")) {
    box.hidden = box.dataset.for !== media;
    box.querySelectorAll("input").forEach((el) => (el.disabled = box.hidden));
  }
}

/** Number inputs whose text the browser cannot read as a number ("5e", "-"): their value reads as "". */
function unreadableFields(form: HTMLFormElement): [string, string][] {
  const fields: [string, string][] = [["seed", "seed"], ...Object.entries(FIELDS[mediaType(form)])];
  return fields.filter(([id]) => input(id).validity.badInput);
}

/** The request the form describes. Empty number fields are left out (the contract's defaults apply). */
export function readRequest(form: HTMLFormElement, userId: string, fileUid: string): GenerationRequest {
  const media = mediaType(form);
  const text = (id: string) => (document.getElementById(id) as HTMLTextAreaElement).value;
  const request: GenerationRequest = {
    prompt: text("prompt"),
    user_id: userId,
    file_uid: fileUid,
    use_cloud_storage: true,
  };
  if (text("negative_prompt").trim()) request.negative_prompt = text("negative_prompt");
  const seed = input("seed");
  // + 0 turns a typed -0 into 0: Firestore would store -0 as a double, which the rules and the worker refuse.
  if (seed.value !== "") request.seed = seed.valueAsNumber + 0;
  for (const [id, field] of Object.entries(FIELDS[media])) {
    const element = input(id);
    if (element.value !== "") request[field] = element.valueAsNumber;
  }
  // Left out, such a field would quietly run at its default: it goes in as text, which the contract refuses as
  // no number (the browser does not tell what was typed).
  for (const [, field] of unreadableFields(form)) (request as unknown as Record<string, unknown>)[field] = "(not a number)";
  return statesItsJob(request, media);
}

/** A request that names no field of its media type gets one at its default, so that it states its job. */
function statesItsJob(request: GenerationRequest, media: MediaType): GenerationRequest {
  // A video job with every video field left to its default still names one, so it is a video job everywhere.
  if (media === "videos" && request.num_frames === undefined) request.num_frames = REQUEST_SCHEMA.properties.num_frames.default;
  // An image job with every field left to its default still names one, its steps, so that its doc states its job:
  // a queued doc with the prompt alone is left to a request that would follow it (PLACEHOLDER_GRACE_SECONDS).
  if (media === "images" && Object.values(FIELDS.images).every((field) => request[field] === undefined))
    request.num_inference_steps = REQUEST_SCHEMA.properties.num_inference_steps.default;
  return request;
}

/** The request fields a job's doc keeps as its request sent them (the page fills the ids and cloud storage). */
const REQUEST_FIELDS = Object.keys(REQUEST_SCHEMA.properties).filter(
  (name) => !["user_id", "file_uid", "use_cloud_storage"].includes(name),
) as (keyof GenerationRequest)[];

/** A request field of a doc as written: by its name, else by the camelCase one of the contract's client sample
 * (`numFrames`), as the worker reads a doc (firegen_core/contract.py's normalise_document_fields; audit: a
 * client's numFrames: 24 filled an empty Frames, and Try again sent 16 frames). */
export function fieldOf(doc: Record<string, unknown>, name: string): unknown {
  return doc[name] !== undefined ? doc[name] : doc[name.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase())];
}

/** A job's request again, as a new job (`fileUid`), from its doc as written: every request field its doc holds
 * (a null one is left out, as the form leaves out an empty one), whatever its value (the contract's check says
 * what is wrong with it). A finished job's doc holds the seed it ran with, drawn or asked for; only a failed
 * job's (cancelled included) is its request's. */
export function requestOf(doc: Record<string, unknown>, media: MediaType, userId: string, fileUid: string): GenerationRequest {
  const request: Record<string, unknown> = { prompt: fieldOf(doc, "prompt") ?? "" };
  for (const name of REQUEST_FIELDS) {
    const value = fieldOf(doc, name);
    if (value !== undefined && value !== null && !(name === "seed" && doc.status === "completed")) request[name] = value;
  }
  Object.assign(request, { user_id: userId, file_uid: fileUid, use_cloud_storage: true });
  return statesItsJob(request as unknown as GenerationRequest, media);
}

/** Fill the form with a job's request (`requestOf`: the seed only where the doc holds its request's), for its
 * media type; a field its doc does not state is left empty (its default). */
export function fillForm(form: HTMLFormElement, doc: Record<string, unknown>, media: MediaType): void {
  const request = requestOf(doc, media, "", "") as unknown as Record<string, unknown>;
  const text = (value: unknown) => (typeof value === "number" || typeof value === "string" ? String(value) : "");
  (form.querySelector(`input[name=media][value=${media}]`) as HTMLInputElement).checked = true;
  applyRanges(form);
  (document.getElementById("prompt") as HTMLTextAreaElement).value = text(fieldOf(doc, "prompt"));
  (document.getElementById("negative_prompt") as HTMLTextAreaElement).value = text(fieldOf(doc, "negative_prompt"));
  input("seed").value = text(request.seed);
  // Every number field, the other media type's too (they come back when it is chosen): only the doc's stand.
  for (const fields of Object.values(FIELDS)) for (const id of Object.keys(fields)) input(id).value = "";
  for (const [id, field] of Object.entries(FIELDS[media])) input(id).value = text(fieldOf(doc, field));
}

/** The form's input for each request field the contract may name in a message (a video's size is Width/Height). */
const INPUT_OF: Record<string, string> = {
  prompt: "prompt",
  negative_prompt: "negative_prompt",
  seed: "seed",
  ...Object.fromEntries(Object.values(FIELDS).flatMap((fields) => Object.entries(fields).map(([id, field]) => [field, id]))),
};

function describedBy(element: HTMLElement, id: string, on: boolean): void {
  const ids = new Set((element.getAttribute("aria-describedby") ?? "").split(/\s+/).filter(Boolean));
  if (on) ids.add(id);
  else ids.delete(id);
  if (ids.size) element.setAttribute("aria-describedby", [...ids].join(" "));
  else element.removeAttribute("aria-describedby");
}

/** The message under the field it names, where the eye is (the web app review: on a phone it showed below
 * Generate, off the screen, the field only outlined in red). Hidden from screen readers, who hear the form's alert,
 * the field's description. null: none. */
function noteUnder(element: HTMLElement, message: string | null): void {
  const id = `${element.id}-error`;
  let note = document.getElementById(id);
  if (message === null) {
    note?.remove();
    return;
  }
  if (!note) {
    note = document.createElement("small");
    note.id = id;
    note.className = "field-error";
    note.setAttribute("aria-hidden", "true");
    (document.getElementById(`${element.id}-range`) ?? element).after(note);
  }
  note.textContent = message;
}

/** Tie the form's error to the field it names (the contract's messages start with it: `width must be between…`,
 * `Validation failed: seed must be…`): aria-invalid, the error as its description, and under it. Any field marked
 * before is cleared; null clears only. A field the form hides or disables (FPS on an image job: `fps is a video
 * field`) is never marked: nobody could see or fix it there (the message still shows). Editing the field marked
 * clears its mark, and the error where it still says it (the review: both stayed until the next Generate). Returns
 * the field marked, if any. */
let markedWith: string | null = null;

export function markInvalid(message: string | null, errorId: string): HTMLElement | null {
  markedWith = null;
  for (const marked of document.querySelectorAll<HTMLElement>("[aria-invalid=true]")) {
    marked.removeAttribute("aria-invalid");
    describedBy(marked, errorId, false);
    noteUnder(marked, null);
  }
  const name = message?.match(/^(?:Validation failed: )?([a-z_]+)\b/)?.[1];
  const id = name && Object.prototype.hasOwnProperty.call(INPUT_OF, name) ? INPUT_OF[name] : null;
  const element = id ? document.getElementById(id) : null;
  if (!message || !element || (element as HTMLInputElement).disabled || element.closest("[hidden]")) return null;
  element.setAttribute("aria-invalid", "true");
  describedBy(element, errorId, true);
  noteUnder(element, message);
  markedWith = message;
  element.addEventListener(
    "input",
    () => {
      if (element.getAttribute("aria-invalid") !== "true") return; // marked no more
      const error = document.getElementById(errorId);
      if (error?.textContent === markedWith) error.textContent = "";
      markInvalid(null, errorId);
    },
    { once: true },
  );
  return element;
}

/** Focus a field the form's error names, its label and its note in view (focus alone scrolled it to the screen's
 * edge, its label cut off: the review). */
export function reveal(element: HTMLElement | null): void {
  if (!element) return;
  element.focus({ preventScroll: true });
  element.scrollIntoView({ block: "center" });
}
