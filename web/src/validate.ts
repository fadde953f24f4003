// The contract's check of a request, in the page, before it sends one through either flow: only firestore.rules
// answer a queued doc's write, and their refusal names no field; the callable would record its refusal as a failed
// job. Limits and ranges come from the contract's schema (contract.gen.ts); the messages are
// firegen_core/contract.py's, word for word and in its order (tests/test_schema.py compares the two field by field).
import { REQUEST_SCHEMA, type GenerationRequest } from "./contract.gen";

/** A request property as schema.py writes it (the subset read here). */
interface Spec {
  type?: "string" | "integer" | "number" | "boolean" | "null";
  anyOf?: readonly Spec[];
  maxLength?: number;
  minimum?: number;
  maximum?: number;
  multipleOf?: number;
  "x-video"?: boolean;
}

// The page fills these itself (the signed-in uid, a random UUID, true); the contract's messages for them are not
// a user's to act on.
const FILLED_BY_PAGE = new Set(["user_id", "file_uid", "use_cloud_storage"]);

const invalid = (what: string) => `Validation failed: ${what}`;

// Something visible, as the contract tells a blank prompt (whitespace, control and format characters alone), from
// the schema's own class: JavaScript's trim() differs from Python's strip() (audit: a prompt of "\x85" was written,
// then refused by the worker; one of a BOM was refused here, accepted by the callable).
const VISIBLE = new RegExp(REQUEST_SCHEMA.properties.prompt.pattern, "u");
// A lone UTF-16 surrogate, which the Firestore SDK would write as U+FFFD (the contract refuses it). No lookbehind:
// Safari before 16.4 cannot parse one, and the whole bundle with it (the review: a page stuck at "Signing in…").
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?:^|[^\ud800-\udbff])[\udc00-\udfff]/;
// JSON.stringify writes a number from 1e21 up with an exponent, which the contract (Python's json) reads as a
// float: a whole one is read as the integer, but a seed that large may have been rounded, as the callable says.
const JSON_INTEGER_LIMIT = 1e21;

/** The contract's message for the first field it refuses, or null where it accepts the request. */
export function contractMessage(request: GenerationRequest): string | null {
  const required = REQUEST_SCHEMA.required as readonly string[];
  for (const [name, spec] of Object.entries(REQUEST_SCHEMA.properties) as [string, Spec][]) {
    if (FILLED_BY_PAGE.has(name)) continue;
    const value = (request as unknown as Record<string, unknown>)[name];
    const message = check(name, spec, value, required.includes(name));
    if (message) return message;
  }
  return null;
}

function check(name: string, node: Spec, value: unknown, required: boolean): string | null {
  if (value === undefined || value === null || (required && typeof value === "string" && !VISIBLE.test(value))) {
    return required ? `${name} is required` : null;
  }
  const nullable = node.anyOf !== undefined;
  const spec = node.anyOf?.find((option) => option.type !== "null") ?? node;
  if (spec.type === "string") {
    if (typeof value !== "string") return invalid(`${name} must be a string`);
    // Python counts code points; a JS string's length counts UTF-16 units (an emoji is two).
    if (spec.maxLength !== undefined && [...value].length > spec.maxLength) {
      return invalid(`${name} must be at most ${spec.maxLength} characters`);
    }
    if (LONE_SURROGATE.test(value)) return invalid(`${name} must be valid Unicode text (it holds a lone UTF-16 surrogate)`);
  } else if (spec.type === "integer" || spec.type === "number") {
    const integer = spec.type === "integer";
    const typeMessage = invalid(`${name} must be ${integer ? "an integer" : "a number"}${nullable ? " or null" : ""}`);
    if (typeof value !== "number" || (integer && !Number.isInteger(value))) return typeMessage;
    if (name === "seed" && Math.abs(value) >= JSON_INTEGER_LIMIT) {
      return invalid("seed must be an integer or null (one past 2^53 sent as floating point may have been rounded)");
    }
    // A seed past 64 bits is refused for its size (the contract's int64 check, as the callable answers it). At
    // exactly ±2^63 the number typed may have been one that fits (2^63 - 1 reads as 2^63): the next message holds.
    if (name === "seed" && (value < -(2 ** 63) || value > 2 ** 63)) return invalid("seed must fit in a signed 64-bit integer");
    // Past 2^53 a JavaScript number is a double: the seed typed would reach the worker rounded (the callable) or
    // as a double, which the contract does not read as an integer (a document).
    if (name === "seed" && !Number.isSafeInteger(value)) {
      return invalid(`seed must be between ${-Number.MAX_SAFE_INTEGER} and ${Number.MAX_SAFE_INTEGER} in this page (a larger one would be rounded)`);
    }
    const { minimum = -Infinity, maximum = Infinity } = spec;
    if (!(Number.isFinite(value) && minimum <= value && value <= maximum)) {
      const bound = (b: number) => (integer ? String(b) : b.toFixed(1));
      return `${name} must be between ${bound(minimum)} and ${bound(maximum)}`;
    }
    if (spec.multipleOf && value % spec.multipleOf) {
      const model = spec["x-video"] ? "H.264 video" : "SDXL";
      return invalid(`${name} must be a multiple of ${spec.multipleOf} for ${model} (got ${value})`);
    }
  }
  return null;
}
