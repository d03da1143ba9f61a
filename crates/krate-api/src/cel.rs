//! CEL expressions as the API uses them (webhook `matchConditions`; later admission
//! policies and CRD validation rules), on the `cel` crate. One place compiles — checking
//! syntax and that only the variables of the expression's environment are referenced,
//! as upstream's type checker refuses undeclared references — and one place evaluates,
//! with JSON objects turned into CEL values (integers as CEL `int`, as upstream's
//! unstructured conversion does).

use std::collections::HashMap;

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
    let program = cel::Program::compile(source).map_err(|e| {
        let detail = e.to_string().replace('\n', "\n ");
        format!("compilation failed: ERROR: <input>:{detail}")
    })?;
    let references = program.references();
    if let Some(unknown) = references.variables().into_iter().find(|v| !variables.contains(v)) {
        return Err(format!("compilation failed: ERROR: <input>:1:1: undeclared reference to '{unknown}'"));
    }
    Ok(Program(program))
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

impl Program {
    fn execute(&self, variables: &[(&str, &Value)]) -> Result<cel::Value, String> {
        let mut context = cel::Context::default();
        for (name, value) in variables {
            context.add_variable_from_value(*name, to_cel(value));
        }
        self.0.execute(&context).map_err(|e| e.to_string())
    }

    /// Evaluates to a boolean with `variables` bound; an error names what went wrong
    /// (a missing field, a non-boolean result).
    pub fn evaluate_bool(&self, variables: &[(&str, &Value)]) -> Result<bool, String> {
        match self.execute(variables)? {
            cel::Value::Bool(b) => Ok(b),
            other => Err(format!("expression must evaluate to bool, got {:?}", other.type_of())),
        }
    }

    /// Evaluates to any value representable in JSON.
    pub fn evaluate(&self, variables: &[(&str, &Value)]) -> Result<Value, String> {
        let value = self.execute(variables)?;
        value.json().map_err(|e| e.to_string())
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
