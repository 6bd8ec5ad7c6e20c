//! Creating (or finding) the demo clients and their sensors through the API.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use termopar_core::ids::{ClientId, SensorId};
use uuid::Uuid;

use crate::{publish::SimSensor, Profile};

/// The two demo companies: name, time zone, and their sensor profiles.
fn demo_clients() -> Vec<(&'static str, chrono_tz::Tz, Vec<Profile>)> {
    vec![
        (
            "Frio Sul Armazéns Frigoríficos",
            chrono_tz::America::Sao_Paulo,
            Profile::cold_storage(chrono_tz::America::Sao_Paulo),
        ),
        (
            "Farma Norte Distribuição",
            chrono_tz::America::Manaus,
            Profile::pharma(chrono_tz::America::Manaus),
        ),
    ]
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{method} {path}: {status}: {body}");
        }
        Ok(body)
    }
}

/// Logs in to the API at `base` (without `/api/v1`) and returns the access token.
pub async fn login(
    http: &reqwest::Client,
    base: &str,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let login = http
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .with_context(|| format!("cannot reach the API at {base}"))?;
    if !login.status().is_success() {
        bail!("login as {email} failed: {}", login.status());
    }
    Ok(login.json::<Value>().await?["access_token"]
        .as_str()
        .context("no access_token in the login response")?
        .to_owned())
}

/// Logs in as an admin and makes sure both demo clients exist with `per_client` sensors
/// each (creating what is missing, reusing what is there). Returns the sensors; with
/// `device_secrets`, each with its device secret (a sensor that existed gets a new one:
/// secrets are shown only when made).
pub async fn provision(
    api_url: &str,
    email: &str,
    password: &str,
    per_client: usize,
    device_secrets: bool,
) -> anyhow::Result<Vec<SimSensor>> {
    let http = reqwest::Client::new();
    let base = api_url.trim_end_matches('/').to_owned();
    let token = login(&http, &base, email, password).await?;
    let api = Api { http, base, token };

    let clients = api
        .call(reqwest::Method::GET, "/clients?page_size=1000", None)
        .await?;
    let mut sensors = Vec::new();
    for (name, tz, profiles) in demo_clients() {
        let existing = clients["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"].as_str() == Some(name))
            .cloned();
        let client = match existing {
            Some(c) => c,
            None => {
                api.call(
                    reqwest::Method::POST,
                    "/clients",
                    Some(json!({ "name": name, "timezone": tz.name() })),
                )
                .await?
            }
        };
        let client_id: Uuid = client["id"].as_str().context("client id")?.parse()?;
        let listed = api
            .call(
                reqwest::Method::GET,
                &format!("/sensors?client_id={client_id}&page_size=1000"),
                None,
            )
            .await?;
        for i in 0..per_client {
            let profile = profiles[i % profiles.len()].clone();
            let name = format!("{}-{:02}", profile.kind, i + 1);
            let found = listed["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"].as_str() == Some(name.as_str()))
                .cloned();
            let mut sensor = match found {
                Some(s) if device_secrets => {
                    let path =
                        format!("/sensors/{}/secret", s["id"].as_str().context("sensor id")?);
                    api.call(reqwest::Method::POST, &path, None).await?
                }
                Some(s) => s,
                None => {
                    api.call(
                        reqwest::Method::POST,
                        "/sensors",
                        Some(json!({
                            "client_id": client_id,
                            "name": name,
                            "location": format!("{} / {}", name, tz.name()),
                            "metadata": { "simulated": true, "profile": profile.kind }
                        })),
                    )
                    .await?
                }
            };
            // A rotation answers with `sensor_id` and the secret.
            let id: Uuid = sensor
                .get("id")
                .or_else(|| sensor.get("sensor_id"))
                .and_then(Value::as_str)
                .context("sensor id")?
                .parse()?;
            sensors.push(SimSensor {
                client_id: ClientId(client_id),
                sensor_id: SensorId(id),
                profile,
                secret: device_secrets
                    .then(|| sensor["device_secret"].take().as_str().map(str::to_owned))
                    .flatten(),
            });
        }
    }
    Ok(sensors)
}
