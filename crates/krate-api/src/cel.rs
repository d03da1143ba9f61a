//! CEL expressions as the API uses them (webhook `matchConditions`; later admission
//! policies and CRD validation rules), on the `cel` crate. One place compiles — checking
//! syntax and that only the variables of the expression's environment are referenced,
//! as upstream's type checker refuses undeclared references — and one place evaluates,
//! with JSON objects turned into CEL values (integers as CEL `int`, as upstream's
//! unstructured conversion does).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;

use crate::error::FieldError;
use crate::strategy::Errors;

/// The variables a webhook's match condition may use.
pub const MATCH_CONDITION_VARIABLES: &[&str] = &["object", "oldObject", "request", "authorizer"];

/// Upstream's limit on match conditions per webhook.
const MAX_MATCH_CONDITIONS: usize = 64;

/// A compiled expression.
pub struct Program(cel::Program);

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cel::Program")
    }
}

/// Compiles `source` for an environment that declares `variables`; the error reads as
/// upstream's (`compilation failed: ERROR: <input>:1:5: ...`).
pub fn compile(source: &str, variables: &[&str]) -> Result<Program, String> {
    let source = object_literals_as_maps(source);
    let program = cel::Program::compile(&source).map_err(|e| format!("compilation failed: {e}"))?;
    let mut free = Vec::new();
    free_variables(program.expression(), &mut Vec::new(), &mut free);
    const TYPES: &[&str] = &["bool", "bytes", "double", "int", "list", "map", "null_type", "string", "type", "uint"];
    let known = |v: &str| variables.contains(&v) || TYPES.contains(&v);
    if let Some(unknown) = free.into_iter().find(|v| !known(v)) {
        return Err(format!("compilation failed: ERROR: <input>:1:1: undeclared reference to '{unknown}'"));
    }
    Ok(Program(program))
}

/// The identifiers an expression reads that no comprehension binds.
fn free_variables(expr: &Expr, bound: &mut Vec<String>, out: &mut Vec<String>) {
    use cel::common::ast::Expr as E;
    match &expr.expr {
        E::Ident(name) if !bound.contains(name) && !out.contains(name) => out.push(name.clone()),
        E::Select(select) => free_variables(&select.operand, bound, out),
        E::Call(call) => {
            for e in call.target.as_deref().into_iter().chain(&call.args) {
                free_variables(e, bound, out);
            }
        }
        E::List(list) => list.elements.iter().for_each(|e| free_variables(e, bound, out)),
        E::Map(map) => {
            for entry in &map.entries {
                if let cel::common::ast::EntryExpr::MapEntry(e) = &entry.expr {
                    free_variables(&e.key, bound, out);
                    free_variables(&e.value, bound, out);
                }
            }
        }
        E::Comprehension(c) => {
            free_variables(&c.iter_range, bound, out);
            free_variables(&c.accu_init, bound, out);
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            for e in [&c.loop_cond, &c.loop_step, &c.result] {
                free_variables(e, bound, out);
            }
            bound.truncate(depth);
        }
        _ => {}
    }
}

/// Mutating admission policies build objects with typed literals (`Object{spec:
/// Object.spec{replicas: 3}}`, `JSONPatch{op: "add", ...}`), which upstream's type
/// checker resolves against the object's schema. Here they become map literals with
/// the field names quoted (`{"spec": {"replicas": 3}}`), which evaluate to the same
/// JSON. String literals are left alone.
pub fn object_literals_as_maps(source: &str) -> String {
    const TYPES: &[&str] = &["Object", "JSONPatch"];
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len() + 16);
    // Open brackets; true for a typed literal's brace, where `name:` is a field name.
    let mut open: Vec<bool> = Vec::new();
    let mut expect_field = false;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            let triple = chars.get(i + 1) == Some(&c) && chars.get(i + 2) == Some(&c);
            let quote_len = if triple { 3 } else { 1 };
            let start = i;
            i += quote_len;
            while i < chars.len() {
                if chars[i] == '\\' {
                    i += 2;
                    continue;
                }
                if chars[i] == c && (!triple || (chars.get(i + 1) == Some(&c) && chars.get(i + 2) == Some(&c))) {
                    i += quote_len;
                    break;
                }
                i += 1;
            }
            out.extend(&chars[start..i.min(chars.len())]);
            expect_field = false;
            continue;
        }
        if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let head = word.split('.').next().unwrap_or_default();
            if TYPES.contains(&head) && chars.get(j) == Some(&'{') {
                out.push('{');
                open.push(true);
                expect_field = true;
                i = j + 1;
                continue;
            }
            if expect_field && open.last() == Some(&true) && chars.get(j) == Some(&':') {
                out.push('"');
                out.push_str(&word);
                out.push('"');
            } else {
                out.push_str(&word);
            }
            expect_field = false;
            continue;
        }
        match c {
            '{' | '(' | '[' => {
                open.push(false);
                expect_field = false;
            }
            '}' | ')' | ']' => {
                open.pop();
                expect_field = false;
            }
            ',' => expect_field = open.last() == Some(&true),
            c if c.is_whitespace() => {}
            _ => expect_field = false,
        }
        out.push(c);
        i += 1;
    }
    out
}

/// The JSON value as CEL sees it.
pub fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(f)) => cel::Value::Float(f),
            _ => cel::Value::Null,
        },
        Value::String(s) => cel::Value::String(s.clone().into()),
        Value::Array(items) => cel::Value::List(items.iter().map(to_cel).collect::<Vec<_>>().into()),
        Value::Object(map) => {
            let map: HashMap<cel::objects::Key, cel::Value> =
                map.iter().map(|(k, v)| (cel::objects::Key::from(k.clone()), to_cel(v))).collect();
            cel::Value::Map(map.into())
        }
    }
}

/// Variables bound for evaluating several expressions against the same request: the
/// JSON is turned into CEL values once.
pub struct Bindings(Vec<(String, cel::Value)>);

thread_local! {
    /// The standard environment (its function registry takes microseconds to build);
    /// each evaluation binds its variables in a scope of its own below it.
    static ROOT: cel::Context<'static, 'static> = cel::Context::default();
}

impl Bindings {
    pub fn new(variables: &[(&str, &Value)]) -> Self {
        Self(variables.iter().map(|(name, value)| (name.to_string(), to_cel(value))).collect())
    }

    /// Binds (or rebinds) one variable.
    pub fn set(&mut self, name: &str, value: &Value) {
        let value = to_cel(value);
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_string(), value)),
        }
    }

    fn execute(&self, program: &cel::Program) -> Result<cel::Value, String> {
        ROOT.with(|root| {
            let mut scope = root.new_inner_scope();
            for (name, value) in &self.0 {
                scope.add_variable_from_value(name.as_str(), value.clone());
            }
            program.execute(&scope).map_err(|e| e.to_string())
        })
    }
}

/// Compiled programs by source and environment: admission and CRD validation evaluate
/// the same few expressions on every request.
type CompiledKey = (String, &'static [&'static str]);
static COMPILED: LazyLock<Mutex<HashMap<CompiledKey, Arc<Program>>>> = LazyLock::new(Default::default);

/// `compile`, remembered: the same source in the same environment compiles once.
pub fn compile_cached(source: &str, variables: &'static [&'static str]) -> Result<Arc<Program>, String> {
    let key = (source.to_string(), variables);
    if let Some(program) = COMPILED.lock().expect("CEL cache").get(&key) {
        return Ok(program.clone());
    }
    let program = Arc::new(compile(source, variables)?);
    let mut cache = COMPILED.lock().expect("CEL cache");
    if cache.len() >= 4096 {
        cache.clear();
    }
    cache.insert(key, program.clone());
    Ok(program)
}

impl Program {
    fn execute(&self, variables: &[(&str, &Value)]) -> Result<cel::Value, String> {
        Bindings::new(variables).execute(&self.0)
    }

    /// Evaluates to a boolean with `variables` bound; an error names what went wrong
    /// (a missing field, a non-boolean result).
    pub fn evaluate_bool(&self, variables: &[(&str, &Value)]) -> Result<bool, String> {
        as_bool(self.execute(variables)?)
    }

    /// `evaluate_bool` against prepared bindings.
    pub fn evaluate_bool_in(&self, bindings: &Bindings) -> Result<bool, String> {
        as_bool(bindings.execute(&self.0)?)
    }

    /// `evaluate` against prepared bindings.
    pub fn evaluate_in(&self, bindings: &Bindings) -> Result<Value, String> {
        bindings.execute(&self.0)?.json().map_err(|e| e.to_string())
    }

    /// Whether the expression reads the variable `name`.
    pub fn references_variable(&self, name: &str) -> bool {
        let mut free = Vec::new();
        free_variables(self.0.expression(), &mut Vec::new(), &mut free);
        free.iter().any(|v| v == name)
    }

    /// A static estimate of the evaluation cost, in the spirit of upstream's estimator:
    /// each node costs one, a comprehension (`all`, `exists`, `map`, `filter`) costs its
    /// body times the size of its range. `range_size` gives the size of a range from its
    /// path (`["self", "spec", "items"]`, `"[]"` for an element of an enclosing range).
    pub fn estimated_cost(&self, range_size: &dyn Fn(&[String]) -> u64) -> u64 {
        cost(self.0.expression(), &mut Vec::new(), range_size)
    }

    /// Evaluates to any value representable in JSON.
    pub fn evaluate(&self, variables: &[(&str, &Value)]) -> Result<Value, String> {
        let value = self.execute(variables)?;
        value.json().map_err(|e| e.to_string())
    }
}

fn as_bool(value: cel::Value) -> Result<bool, String> {
    match value {
        cel::Value::Bool(b) => Ok(b),
        other => Err(format!("expression must evaluate to bool, got {:?}", other.type_of())),
    }
}

type Expr = cel::common::ast::IdedExpr;

/// The path an expression selects (`self.spec.items`), with comprehension variables
/// replaced by their range's path and `[]`.
fn path_of(expr: &Expr, bound: &[(String, Vec<String>)]) -> Option<Vec<String>> {
    use cel::common::ast::Expr as E;
    match &expr.expr {
        E::Ident(name) => match bound.iter().rev().find(|(var, _)| var == name) {
            Some((_, path)) => Some(path.clone()),
            None => Some(vec![name.clone()]),
        },
        E::Select(select) => {
            let mut path = path_of(&select.operand, bound)?;
            path.push(select.field.clone());
            Some(path)
        }
        _ => None,
    }
}

fn cost(expr: &Expr, bound: &mut Vec<(String, Vec<String>)>, range_size: &dyn Fn(&[String]) -> u64) -> u64 {
    use cel::common::ast::Expr as E;
    match &expr.expr {
        E::Comprehension(c) => {
            let range = path_of(&c.iter_range, bound);
            let size = range.as_deref().map_or(1, range_size);
            let mut element = range.unwrap_or_default();
            element.push("[]".into());
            bound.push((c.iter_var.clone(), element));
            let body = cost(&c.loop_step, bound, range_size) + cost(&c.loop_cond, bound, range_size);
            bound.pop();
            let outside = cost(&c.iter_range, bound, range_size) + cost(&c.accu_init, bound, range_size);
            outside
                .saturating_add(size.saturating_mul(body.saturating_add(1)))
                .saturating_add(cost(&c.result, bound, range_size))
        }
        E::Call(call) => {
            let target = call.target.as_deref().map_or(0, |t| cost(t, bound, range_size));
            call.args.iter().fold(1 + target, |sum, a| sum.saturating_add(cost(a, bound, range_size)))
        }
        E::Select(select) => 1 + cost(&select.operand, bound, range_size),
        E::List(list) => list.elements.iter().fold(1, |sum, e| sum.saturating_add(cost(e, bound, range_size))),
        E::Map(map) => map.entries.len() as u64 + 1,
        _ => 1,
    }
}

/// Upstream's checks of `matchConditions`: at most 64, named with unique qualified
/// names, each expression compiling in the match-condition environment.
pub fn validate_match_conditions(conditions: &Value, path: &str, errs: &mut Errors) {
    let Some(list) = conditions.as_array() else { return };
    if list.len() > MAX_MATCH_CONDITIONS {
        errs.push(FieldError::too_many(path, list.len(), MAX_MATCH_CONDITIONS as u64));
    }
    let mut names = std::collections::HashSet::new();
    for (i, condition) in list.iter().enumerate() {
        let name = condition["name"].as_str().unwrap_or_default();
        let name_path = format!("{path}[{i}].name");
        if name.is_empty() {
            errs.push(FieldError::required(name_path, ""));
        } else if let Some(problems) = Some(crate::validation::is_qualified_name(name)).filter(|p| !p.is_empty()) {
            errs.push(FieldError::invalid(name_path, &Value::from(name), &problems.join("; ")));
        } else if !names.insert(name) {
            errs.push(FieldError::duplicate(name_path, &Value::from(name)));
        }
        let expression = condition["expression"].as_str().unwrap_or_default();
        let expression_path = format!("{path}[{i}].expression");
        if expression.is_empty() {
            errs.push(FieldError::required(expression_path, ""));
        } else if let Err(e) = compile(expression, MATCH_CONDITION_VARIABLES) {
            errs.push(FieldError::invalid(expression_path, &Value::from(expression), &e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn expressions_compile_and_evaluate_on_json_objects() {
        let program = compile("object.metadata.name != 'skip-me' && object.spec.replicas <= 5", &["object"]).unwrap();
        let obj = json!({"metadata": {"name": "a"}, "spec": {"replicas": 3}});
        assert_eq!(program.evaluate_bool(&[("object", &obj)]), Ok(true));
        let obj = json!({"metadata": {"name": "skip-me"}, "spec": {"replicas": 3}});
        assert_eq!(program.evaluate_bool(&[("object", &obj)]), Ok(false));
    }

    #[test]
    fn typed_object_literals_evaluate_to_json() {
        assert_eq!(
            object_literals_as_maps(
                r#"Object{spec: Object.spec{replicas: 3, name: "a: b"}, metadata: Object.metadata{labels: {"x": 'y'}}}"#
            ),
            r#"{"spec": {"replicas": 3, "name": "a: b"}, "metadata": {"labels": {"x": 'y'}}}"#
        );
        let program = compile("Object{spec: Object.spec{replicas: object.spec.replicas + 1}}", &["object"]).unwrap();
        let obj = json!({"spec": {"replicas": 2}});
        assert_eq!(program.evaluate(&[("object", &obj)]).unwrap(), json!({"spec": {"replicas": 3}}));
        let patch =
            compile(r#"[JSONPatch{op: "add", path: "/spec/x", value: size(object.spec)}]"#, &["object"]).unwrap();
        assert_eq!(patch.evaluate(&[("object", &obj)]).unwrap(), json!([{"op": "add", "path": "/spec/x", "value": 1}]));
    }

    #[test]
    fn syntax_errors_and_undeclared_variables_fail_to_compile() {
        let err = compile("... [] bad expression", MATCH_CONDITION_VARIABLES).unwrap_err();
        assert!(err.starts_with("compilation failed: "), "{err}");
        let err = compile("foo == 1", MATCH_CONDITION_VARIABLES).unwrap_err();
        assert!(err.contains("undeclared reference to 'foo'"), "{err}");
    }

    #[test]
    fn a_non_boolean_result_or_a_missing_field_is_an_error() {
        let program = compile("object.metadata", &["object"]).unwrap();
        assert!(program.evaluate_bool(&[("object", &json!({"metadata": {}}))]).is_err());
        let program = compile("object.spec.missing == 1", &["object"]).unwrap();
        assert!(program.evaluate_bool(&[("object", &json!({"spec": {}}))]).is_err());
    }

    #[test]
    fn match_conditions_are_validated() {
        let mut errs = Errors::new();
        let conditions = json!([
            {"name": "a", "expression": "object != null"},
            {"name": "a", "expression": "... [] bad expression"},
            {"name": "", "expression": ""},
        ]);
        validate_match_conditions(&conditions, "webhooks[0].matchConditions", &mut errs);
        let lines: Vec<String> = errs.iter().map(FieldError::to_line).collect();
        assert!(
            lines.contains(&"webhooks[0].matchConditions[1].name: Duplicate value: \"a\"".to_string()),
            "{lines:?}"
        );
        assert!(lines.iter().any(|l| l.starts_with("webhooks[0].matchConditions[1].expression: Invalid value: \"... [] bad expression\": compilation failed")), "{lines:?}");
        assert!(lines.contains(&"webhooks[0].matchConditions[2].name: Required value".to_string()), "{lines:?}");
        assert!(lines.contains(&"webhooks[0].matchConditions[2].expression: Required value".to_string()), "{lines:?}");
    }
}
