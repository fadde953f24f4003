// A stand-in for the Firebase CLI's Cloud Storage rules runtime (cloud-storage-rules-runtime-*.jar), which the
// CLI downloads from a host this project's machines cannot reach. It speaks the same line protocol on stdin and
// stdout (`java -jar <jar> serve`, as firebase-tools' lib/emulator/storage/rules/runtime.js drives it) and
// evaluates with the Firebase rules engine that Google ships inside the Firestore emulator jar (the gcloud
// component or the CLI's own download): the same compiler and evaluator, and the `firebase.storage` service
// that the jar declares. firebase-tools builds `request` and `resource` itself and sends them as the engine's
// ExpressionValue protos in JSON; this program only compiles rulesets and evaluates them.
//
// Not supported: firestore.get()/firestore.exists() in Storage rules (the real runtime asks the CLI for the
// document): such a rule fails to evaluate, which denies. scripts/setup_firebase_cli.py compiles this file.

import com.google.firebase.rules.lang.CompileResult;
import com.google.firebase.rules.lang.FirebaseRulesProtoCompiler;
import com.google.firebase.rules.runtime.common.EvaluationResult;
import com.google.firebase.rules.runtime.evaluators.AuthRuleEvaluator.RuleContext;
import com.google.firebase.rules.runtime.impl.DefaultEvaluator;
import com.google.firebase.rules.runtime.v1.ExpressionValue;
import com.google.firebase.rules.runtime.v1.RulesetAst;
import com.google.firebase.rules.v1.Issue;
import com.google.firebase.rules.v1.Source;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import com.google.protobuf.util.JsonFormat;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.TimeUnit;

public final class StorageRulesRuntime {
  private static final JsonFormat.Parser PROTO = JsonFormat.parser().ignoringUnknownFields();
  private static final Map<String, RulesetAst> RULESETS = new HashMap<>();

  public static void main(String[] args) throws Exception {
    if (args.length != 1 || !args[0].equals("serve")) {
      System.err.println("usage: java -jar storage-rules-runtime.jar serve");
      System.exit(2);
    }
    // The engine logs through java.util.logging to stderr, which the CLI shows as "Unexpected rules runtime
    // error": keep stderr for real failures. (Java 24+ still warns there once about protobuf's sun.misc.Unsafe.)
    java.util.logging.LogManager.getLogManager().reset();
    PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    JsonObject ready = new JsonObject();
    ready.addProperty("id", -1); // the CLI's start() waits for this id
    ready.addProperty("status", "ok");
    out.println(ready);
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    for (String line; (line = in.readLine()) != null; ) {
      if (line.isBlank()) {
        continue;
      }
      JsonObject request = JsonParser.parseString(line).getAsJsonObject();
      JsonObject response = new JsonObject();
      response.add("id", request.get("id"));
      JsonArray errors = new JsonArray();
      JsonArray warnings = new JsonArray();
      try {
        String action = request.get("action").getAsString();
        JsonObject context = request.getAsJsonObject("context");
        if (action.equals("load_ruleset")) {
          response.add("result", load(context, errors, warnings));
        } else if (action.equals("verify")) {
          response.add("result", verify(context, warnings));
        } else {
          errors.add("unsupported action " + action);
        }
      } catch (Exception e) {
        errors.add(e.toString());
      }
      response.addProperty("status", "ok");
      response.add("errors", errors);
      response.add("warnings", warnings);
      out.println(response);
    }
  }

  private static JsonObject load(JsonObject context, JsonArray errors, JsonArray warnings) throws Exception {
    Source.Builder source = Source.newBuilder();
    PROTO.merge(context.getAsJsonObject("source").toString(), source);
    CompileResult compiled = FirebaseRulesProtoCompiler.createStandalone().compile(source.build());
    for (Issue issue : compiled.getIssues()) {
      String where = issue.getSourcePosition().getFileName() + ":" + issue.getSourcePosition().getLine();
      (issue.getSeverity() == Issue.Severity.ERROR ? errors : warnings).add(where + " " + issue.getDescription());
    }
    JsonObject result = new JsonObject();
    if (errors.size() == 0) {
      RulesetAst ast = compiled.getRulesetAst();
      RULESETS.put(context.get("rulesetName").getAsString(), ast);
      result.addProperty("rulesVersion", ast.getVersion() == RulesetAst.Version.VERSION_2 ? 2 : 1);
    }
    return result;
  }

  private static JsonObject verify(JsonObject context, JsonArray warnings) throws Exception {
    RulesetAst ast = RULESETS.get(context.get("rulesetName").getAsString());
    if (ast == null) {
      throw new IllegalStateException("no ruleset " + context.get("rulesetName"));
    }
    RuleContext.Builder rule =
        RuleContext.builder()
            .service(context.get("service").getAsString())
            .method(context.get("method").getAsString())
            .path(context.get("path").getAsString());
    for (Map.Entry<String, JsonElement> variable : context.getAsJsonObject("variables").entrySet()) {
      ExpressionValue.Builder value = ExpressionValue.newBuilder();
      PROTO.merge(variable.getValue().toString(), value);
      rule.supplyVariable(variable.getKey(), value.build());
    }
    boolean permit;
    try {
      EvaluationResult result = new DefaultEvaluator(ast).evaluate(rule.build()).get(10, TimeUnit.SECONDS);
      permit = result.permit();
    } catch (java.util.concurrent.ExecutionException e) {
      warnings.add("rules evaluation failed: " + e.getCause()); // a rule that cannot be evaluated denies
      permit = false;
    }
    JsonObject result = new JsonObject();
    result.addProperty("permit", permit);
    return result;
  }
}
