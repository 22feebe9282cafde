//! `depends_on` in compose files: the short form (a list of service names) and the long form
//! (a map of names to `condition`, `required`, `restart`) become the services'
//! `crate::depends::Dependency`s, by Rudder name. After every service is converted, `check`
//! refuses a dependency on a service the files do not define (unless `required: false`) and
//! any cycle, naming the services in it.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::{key_str, ComposeError, Cx};
use crate::depends::{Condition, Dependency};
use crate::spec::ServiceSpec;

/// Dependencies of one service, as written; names are compose names until [`check`].
pub(crate) fn parse(cx: &mut Cx, field: &str, v: &Value) -> Result<Vec<Dependency>, ComposeError> {
    let mut out = Vec::new();
    match v {
        Value::Null => {}
        Value::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                let Some(name) = item.as_str() else {
                    return Err(cx.err(&format!("{field}[{i}]"), "expected a service name"));
                };
                out.push(Dependency {
                    service: name.to_string(),
                    condition: Condition::Started,
                    required: true,
                });
            }
        }
        Value::Mapping(m) => {
            for (name, def) in m {
                let name = key_str(name);
                let f = format!("{field}.{name}");
                let mut dep = Dependency {
                    service: name,
                    condition: Condition::Started,
                    required: true,
                };
                match def {
                    Value::Null => {}
                    Value::Mapping(d) => {
                        for (k, val) in d {
                            let k = key_str(k);
                            let kf = format!("{f}.{k}");
                            match k.as_str() {
                                "condition" => {
                                    dep.condition = match val.as_str() {
                                        Some("service_started") => Condition::Started,
                                        Some("service_healthy") => Condition::Healthy,
                                        Some("service_completed_successfully") => {
                                            Condition::CompletedSuccessfully
                                        }
                                        _ => {
                                            return Err(cx.err(
                                                &kf,
                                                "expected service_started, service_healthy or \
                                                 service_completed_successfully",
                                            ))
                                        }
                                    }
                                }
                                "required" => {
                                    dep.required = val
                                        .as_bool()
                                        .ok_or_else(|| cx.err(&kf, "expected true or false"))?
                                }
                                // Restarting dependents with their dependency is `docker
                                // compose up`'s; in a cluster each service restarts on its own.
                                "restart" => {
                                    val.as_bool()
                                        .ok_or_else(|| cx.err(&kf, "expected true or false"))?;
                                }
                                _ => cx.warn(&kf, "not supported by Rudder; ignored"),
                            }
                        }
                    }
                    _ => return Err(cx.err(&f, "expected a mapping (condition, required)")),
                }
                out.push(dep);
            }
        }
        _ => return Err(cx.err(field, "expected a list or a mapping of service names")),
    }
    Ok(out)
}

/// Resolves every dependency's compose name (`compose_of`: Rudder name → compose name of each
/// service) to its Rudder name, refusing unknown required ones and cycles.
pub(crate) fn check(
    cx: &mut Cx,
    specs: &mut [ServiceSpec],
    compose_of: &BTreeMap<String, String>,
) -> Result<(), ComposeError> {
    let rudder_of: BTreeMap<&str, &str> = compose_of
        .iter()
        .map(|(r, c)| (c.as_str(), r.as_str()))
        .collect();
    let healthchecked: BTreeMap<String, bool> = specs
        .iter()
        .map(|s| (s.name.clone(), s.healthcheck.is_some()))
        .collect();
    let mut warnings = Vec::new();
    for spec in specs.iter_mut() {
        let me = compose_of.get(&spec.name).cloned().unwrap_or_default();
        for dep in &mut spec.depends_on {
            let field = format!("services.{me}.depends_on.{}", dep.service);
            match rudder_of.get(dep.service.as_str()) {
                Some(r) => {
                    if dep.condition == Condition::Healthy && healthchecked.get(*r) == Some(&false)
                    {
                        warnings.push((
                            field,
                            format!(
                                "{:?} has no healthcheck: service_healthy waits until it runs",
                                dep.service
                            ),
                        ));
                    }
                    dep.service = r.to_string();
                }
                None if dep.required => {
                    return Err(cx.err(
                        &field,
                        format!("no service {:?} in the compose file", dep.service),
                    ))
                }
                None => {
                    warnings.push((
                        field,
                        format!(
                            "no service {:?} in the compose file (required: false): not waited for",
                            dep.service
                        ),
                    ));
                    dep.service = cx.dns(&format!("services.{me}.depends_on"), &dep.service)?;
                }
            }
        }
        crate::depends::validate(spec).map_err(|e| {
            cx.err(
                &format!("services.{me}.depends_on"),
                format!("{}: {}", e.field, e.message),
            )
        })?;
    }
    for (f, w) in warnings {
        cx.warn(&f, w);
    }
    if let Some(cycle) = crate::depends::find_cycle(specs) {
        let names: Vec<&str> = cycle
            .iter()
            .map(|r| compose_of.get(r).map_or(r.as_str(), String::as_str))
            .collect();
        return Err(cx.err(
            &format!("services.{}.depends_on", names[0]),
            format!("dependency cycle: {}", names.join(" -> ")),
        ));
    }
    Ok(())
}
