// figment::Jail closures return figment::Error, which is large by design.
#![allow(clippy::result_large_err)]

use super::*;
use figment::Jail;
use std::time::Duration;

fn load(jail: &Jail) -> Result<Config, ConfigError> {
    Config::load(
        Some(&jail.directory().join("berth.toml")),
        &Overrides::default(),
    )
}

#[test]
fn layers_file_then_env_then_flags() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "berth.toml",
            r#"
            [server]
            listen = "127.0.0.1:1000"
            [modules.hello]
            file = "hello.wasm"
            route = "/hello"
            config = { greeting = "hello", count = 3 }
            "#,
        )?;
        jail.set_env("BERTH_MODULES__HELLO__CONFIG__GREETING", "hola");
        jail.set_env("BERTH_ADMIN__LISTEN", "127.0.0.1:2000");
        let cfg = load(jail).unwrap();
        let hello = &cfg.modules["hello"];
        assert_eq!(hello.config["greeting"].0, "hola");
        assert_eq!(hello.config["count"].0, "3");
        assert_eq!(cfg.server.listen.port(), 1000);
        assert_eq!(cfg.admin.listen.port(), 2000);
        let flags = Overrides {
            listen: Some("127.0.0.1:3000".parse().unwrap()),
            ..Overrides::default()
        };
        let cfg = Config::load(Some(&jail.directory().join("berth.toml")), &flags).unwrap();
        assert_eq!(cfg.server.listen.port(), 3000);
        // modules_dir defaults to /modules; relative ones resolve against
        // the config file's folder.
        assert_eq!(cfg.modules_dir(), PathBuf::from("/modules"));
        Ok(())
    });
}

#[test]
fn relative_modules_dir_is_relative_to_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("berth.toml", "[runtime]\nmodules_dir = \"wasm\"\n")?;
        let cfg = load(jail).unwrap();
        assert_eq!(cfg.modules_dir(), jail.directory().join("wasm"));
        Ok(())
    });
}

#[test]
fn errors_name_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file("berth.toml", "[server]\nlisten = \"nope\"\n")?;
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");

        jail.create_file("berth.toml", "[sever]\nlisten = \"127.0.0.1:1\"\n")?;
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("sever"), "{err}");

        jail.create_file(
            "berth.toml",
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"a\"\n",
        )?;
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("modules.a.route"), "{err}");

        jail.create_file(
            "berth.toml",
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"/x\"\n[modules.b]\nfile = \"b.wasm\"\nroute = \"/x/\"\n",
        )?;
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("already used by module `a`"), "{err}");

        jail.create_file(
            "berth.toml",
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\nlimits = { memory = \"12 parsecs\" }\n",
        )?;
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("parsecs") && err.contains("memory"), "{err}");

        jail.create_file(
            "berth.toml",
            "[modules.a]\nurl = \"https://x/a.wasm\"\nroute = \"/a\"\n",
        )?;
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("modules.a.sha256"), "{err}");

        jail.create_file("berth.toml", "[modules.a]\nroute = \"/a\"\n")?;
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("modules.a.file"), "{err}");

        jail.create_file(
            "berth.toml",
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\nallowed_outbound_hosts = [\"example.com\"]\n",
        )?;
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("allowed_outbound_hosts[0]"), "{err}");
        Ok(())
    });
}

#[test]
fn oci_sources_and_registry_settings_are_checked_with_their_key() {
    Jail::expect_with(|jail| {
        let digest = "a".repeat(64);
        let cases = [
            (
                format!(
                    "[modules.a]\noci = \"r.example/t/a@sha256:{digest}\"\nfile = \"a.wasm\"\nroute = \"/a\"\n"
                ),
                "modules.a.oci",
            ),
            (
                "[modules.a]\noci = \"r.example/t/a:1.0\"\nroute = \"/a\"\n".to_owned(),
                "allow_tags",
            ),
            (
                "[modules.a]\nfile = \"a.wasm\"\nallow_tags = true\nroute = \"/a\"\n".to_owned(),
                "modules.a.allow_tags",
            ),
            (
                format!(
                    "[modules.a]\noci = \"r.example/t/a@sha256:{digest}\"\nsha256 = \"{digest}\"\nroute = \"/a\"\n"
                ),
                "modules.a.sha256",
            ),
            (
                "[registry.credentials.\"r.example\"]\nusername = \"bot\"\n".to_owned(),
                "registry.credentials",
            ),
            (
                "[registry]\nca_file = \"/nonexistent/ca.pem\"\n".to_owned(),
                "registry.ca_file",
            ),
            (
                "[registry]\ninsecure_registries = [\"http://x\"]\n".to_owned(),
                "insecure_registries[0]",
            ),
        ];
        for (toml, key) in cases {
            jail.create_file("berth.toml", &toml)?;
            let err = load(jail).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
        // A tag with allow_tags, and credentials that are never printed.
        jail.create_file(
            "berth.toml",
            "[modules.a]\noci = \"r.example/t/a:1.0\"\nallow_tags = true\nroute = \"/a\"\n\
             [registry.credentials.\"r.example\"]\nusername = \"bot\"\npassword = \"hunter2\"\n",
        )?;
        let cfg = load(jail).unwrap();
        let printed = format!("{} {:?}", serde_json::to_string(&cfg).unwrap(), cfg);
        assert!(!printed.contains("hunter2"), "{printed}");
        Ok(())
    });
}

#[test]
fn missing_config_file_is_an_error() {
    let err = Config::load(
        Some(Path::new("/nonexistent/berth.toml")),
        &Overrides::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/berth.toml"));
}

#[test]
fn secrets_are_redacted_when_printed() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "berth.toml",
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\nsecrets = { token = \"s3cr3t\" }\n",
        )?;
        let cfg = load(jail).unwrap();
        assert_eq!(cfg.modules["a"].secrets["token"].0.0, "s3cr3t");
        let printed = format!("{} {:?}", serde_json::to_string(&cfg).unwrap(), cfg);
        assert!(!printed.contains("s3cr3t"), "{printed}");

        // Every URL field, a canary's too, through the same type.
        let sha = "a".repeat(64);
        jail.create_file(
            "berth.toml",
            &format!(
                "[modules.a]\nurl = \"https://u:hunter2@h/a.wasm?sig=k3y\"\nsha256 = \"{sha}\"\n\
                 route = \"/a\"\n[modules.a.canary]\nurl = \"https://u:hunter3@h/b.wasm?sig=k4y\"\n\
                 sha256 = \"{}\"\n",
                "b".repeat(64)
            ),
        )?;
        let cfg = load(jail).unwrap();
        let printed = format!("{} {:?}", serde_json::to_string(&cfg).unwrap(), cfg);
        for secret in ["hunter2", "hunter3", "k3y", "k4y"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("h/b.wasm"), "{printed}");
        Ok(())
    });
}

#[test]
fn byte_sizes() {
    assert_eq!(ByteSize::parse("128MiB").unwrap().0, 128 << 20);
    assert_eq!(ByteSize::parse("10 kb").unwrap().0, 10_000);
    assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
    assert!(ByteSize::parse("MiB").is_err());
    assert!(ByteSize::parse("1 XB").is_err());
    assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
}

#[test]
fn durations_that_would_overflow_a_deadline_are_refused_with_their_key() {
    for (toml, key) in [
        (
            "[defaults.limits]\ntimeout = \"500000000years\"\n",
            "defaults.limits.timeout",
        ),
        (
            "[defaults.outbound]\ntimeout = \"99999999days\"\n",
            "defaults.outbound.timeout",
        ),
        (
            "[defaults.outbound]\ncircuit_breaker = { open_for = \"9999999days\" }\n",
            "defaults.outbound.circuit_breaker.open_for",
        ),
        (
            "[shutdown]\ngrace_period = \"400days\"\n",
            "shutdown.grace_period",
        ),
        ("[runtime]\nepoch_tick = \"1h\"\n", "runtime.epoch_tick"),
        (
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\nlimits = { timeout = \"100000days\" }\n",
            "modules.a.limits.timeout",
        ),
    ] {
        Jail::expect_with(|jail| {
            jail.create_file("berth.toml", toml)?;
            let err = load(jail).unwrap_err().to_string();
            assert!(
                err.contains(key) && err.contains("too long"),
                "{toml}: {err}"
            );
            Ok(())
        });
    }
}

#[test]
fn release_idle_after_defaults_to_30s_and_is_at_most_an_hour() {
    assert_eq!(
        Config::default().runtime.release_idle_after,
        Duration::from_secs(30)
    );
    Jail::expect_with(|jail| {
        jail.create_file("berth.toml", "")?;
        let cfg = load(jail).unwrap();
        assert_eq!(cfg.runtime.release_idle_after, Duration::from_secs(30));
        for (text, want) in [("0s", Duration::ZERO), ("1h", Duration::from_secs(3600))] {
            jail.create_file(
                "berth.toml",
                &format!("[runtime]\nrelease_idle_after = \"{text}\"\n"),
            )?;
            assert_eq!(load(jail).unwrap().runtime.release_idle_after, want);
        }
        jail.create_file("berth.toml", "[runtime]\nrelease_idle_after = \"2h\"\n")?;
        let err = load(jail).unwrap_err().to_string();
        assert!(
            err.contains("runtime.release_idle_after") && err.contains("too long"),
            "{err}"
        );
        Ok(())
    });
}

#[test]
fn only_known_sections_are_read_from_the_environment() {
    Jail::expect_with(|jail| {
        jail.create_file("berth.toml", "")?;
        jail.set_env("BERTH_SERVICE_HOST", "10.96.0.10");
        jail.set_env("BERTH_PORT_80_TCP_ADDR", "10.96.0.10");
        jail.set_env("BERTH_ADMIN_SERVICE_PORT", "9090");
        jail.set_env("BERTH_RUNTIME__MAX_INSTANCES", "7");
        let cfg = load(jail).unwrap();
        assert_eq!(cfg.runtime.max_instances, 7);
        let ignored = ignored_env_vars();
        for name in [
            "BERTH_SERVICE_HOST",
            "BERTH_PORT_80_TCP_ADDR",
            "BERTH_ADMIN_SERVICE_PORT",
        ] {
            assert!(ignored.contains(&name.to_owned()), "{ignored:?}");
        }
        assert!(!ignored.iter().any(|n| n == "BERTH_RUNTIME__MAX_INSTANCES"));

        jail.set_env("BERTH_DEFAULTS__LIMITS__TIMOUT", "1s");
        let err = load(jail).unwrap_err().to_string();
        assert!(err.to_lowercase().contains("timout"), "{err}");
        Ok(())
    });
}

#[test]
fn a_canarys_settings_hash_follows_its_table_and_defaults_but_not_its_secrets() {
    Jail::expect_with(|jail| {
        let settings = |jail: &Jail, table: &str| {
            jail.create_file(
                "berth.toml",
                &format!(
                    "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\n{table}\n\
                     [modules.a.canary]\nfile = \"b.wasm\"\n"
                ),
            )
            .unwrap();
            let [canary] = load(jail).unwrap().canary_specs().try_into().unwrap();
            canary.settings
        };
        let base = settings(jail, "config = { greeting = \"hi\" }");
        assert_eq!(base.len(), 8, "{base}");
        assert_eq!(base, settings(jail, "config = { greeting = \"hi\" }"));
        assert_ne!(base, settings(jail, "config = { greeting = \"ho\" }"));
        assert_ne!(
            base,
            settings(
                jail,
                "config = { greeting = \"hi\" }\nlimits = { timeout = \"1s\" }"
            )
        );
        // A secret's value is in no label, even hashed: rotating it is the
        // same canary.
        let secret =
            |v: &str| format!("config = {{ greeting = \"hi\" }}\nsecrets = {{ key = \"{v}\" }}");
        assert_eq!(
            settings(jail, &secret("0042")),
            settings(jail, &secret("0043"))
        );
        Ok(())
    });
}

#[test]
fn a_canary_is_checked_with_its_key_and_resolved_next_to_its_module() {
    Jail::expect_with(|jail| {
        let module = "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\n[modules.a.canary]\n";
        let cases = [
            ("", "modules.a.canary.file`: missing"),
            ("file = \"a.wasm\"\n", "same source as the module"),
            ("file = \"b.wasm\"\nsteps = []\n", "modules.a.canary.steps"),
            ("file = \"b.wasm\"\nsteps = [5, 0]\n", "0 is not a weight"),
            ("file = \"b.wasm\"\nsteps = [50, 20]\n", "must rise"),
            (
                "file = \"b.wasm\"\nsteps = [5, 101]\n",
                "101 is not a weight",
            ),
            (
                "file = \"b.wasm\"\ninterval = \"10ms\"\n",
                "modules.a.canary.interval",
            ),
            (
                "file = \"b.wasm\"\nmin_success_rate = 101\n",
                "min_success_rate",
            ),
            ("file = \"b.wasm\"\nmax_p99_ratio = -1\n", "max_p99_ratio"),
            ("file = \"b.wasm\"\nmax_failures = 0\n", "max_failures"),
            (
                "file = \"b.wasm\"\nmin_requests = 0\n",
                "never promoted on no data",
            ),
            (
                "file = \"b.wasm\"\nsticky = {}\n",
                "modules.a.canary.sticky",
            ),
            (
                "file = \"b.wasm\"\nsticky = { header = \"a b\" }\n",
                "sticky.header",
            ),
            (
                "file = \"b.wasm\"\nsticky = { cookie = \"a;b\" }\n",
                "sticky.cookie",
            ),
            (
                "url = \"https://x.example/b.wasm\"\n",
                "modules.a.canary.sha256",
            ),
            ("file = \"b.wasm\"\nweight = 5\n", "weight"),
        ];
        // Fleet analysis: a URL without credentials, labels that select
        // (and are not Berth's own), windows of at least two scrapes.
        let fleet = |rest: &str| {
            format!("file = \"b.wasm\"\ninterval = \"1m\"\n[modules.a.canary.analysis]\n{rest}")
        };
        let p = "prometheus = \"http://prom:9090\"\n";
        let ns = "labels = { namespace = \"shop\" }\n";
        let analysis_cases = [
            (fleet(p), "analysis.labels`: name the labels".to_owned()),
            (
                fleet(&format!("prometheus = \"http://u:p@prom\"\n{ns}")),
                "analysis.prometheus".into(),
            ),
            (
                fleet(&format!("prometheus = \"ftp://prom\"\n{ns}")),
                "analysis.prometheus".into(),
            ),
            (
                fleet(&format!("{p}labels = {{ module = \"x\" }}\n")),
                "set by Berth's own queries".into(),
            ),
            (
                fleet(&format!("{p}labels = {{ \"a-b\" = \"x\" }}\n")),
                "not a Prometheus label name".into(),
            ),
            (
                fleet(&format!("{p}labels = {{ ns = \"\" }}\n")),
                "1 to 256 bytes".into(),
            ),
            (
                fleet(&format!("{p}{ns}scrape_interval = \"31s\"\n")),
                "modules.a.canary.interval".into(),
            ),
            (
                fleet(&format!(
                    "{p}{ns}scrape_interval = \"18446744073709551615s\"\n"
                )),
                "analysis.scrape_interval".into(),
            ),
            (
                fleet(&format!("{p}{ns}rollback_after_unavailable = \"30s\"\n")),
                "at least the canary's interval".into(),
            ),
        ];
        for (canary, want) in analysis_cases {
            let toml = format!("{module}{canary}");
            jail.create_file("berth.toml", &toml)?;
            let err = load(jail).unwrap_err().to_string();
            assert!(err.contains(&want), "{toml}: {err}");
        }
        for (canary, want) in cases {
            let toml = format!("{module}{canary}");
            jail.create_file("berth.toml", &toml)?;
            let err = load(jail).unwrap_err().to_string();
            assert!(err.contains(want), "{toml}: {err}");
        }
        jail.create_file(
            "berth.toml",
            &format!("{module}file = \"b.wasm\"\nsticky = {{ cookie = \"uid\" }}\n"),
        )?;
        let cfg = load(jail).unwrap();
        let [canary] = cfg.canary_specs().try_into().unwrap();
        assert_eq!(canary.policy.steps, [5, 25, 50, 100]);
        assert_eq!(canary.policy.min_success_rate, 99.0);
        assert_eq!(canary.policy.max_failures, 1);
        assert_eq!(canary.module.track, Track::Canary);
        assert_eq!(canary.module.route, "/a");
        let ModuleSource::File { path, .. } = &canary.module.source else {
            panic!("{:?}", canary.module.source)
        };
        assert!(path.ends_with("b.wasm"), "{path:?}");
        assert_eq!(cfg.module_specs()[0].track, Track::Stable);
        Ok(())
    });
}

#[test]
fn a_value_in_the_wrong_place_is_never_quoted() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "berth.toml",
            "[modules.x]\nfile = \"a.wasm\"\nroute = \"/a\"\n",
        )?;
        jail.create_file(
            "sec.toml",
            "[modules.x]\nsecrets = \"SUPERSECRET \\\" quoted\"\n",
        )?;
        let flags = Overrides {
            secrets_file: Some(jail.directory().join("sec.toml")),
            ..Overrides::default()
        };
        let err = Config::load(Some(&jail.directory().join("berth.toml")), &flags)
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("SUPERSECRET") && !err.contains("quoted"),
            "{err}"
        );
        assert!(
            err.contains("modules.x.secrets") && err.contains("sec.toml"),
            "{err}"
        );
        Ok(())
    });
    assert_eq!(
        without_values(r#"found string "a \" b", expected u32 for key "k""#),
        r#"found a string, expected u32 for key "k""#
    );
}

#[test]
fn a_syntax_error_names_the_line_but_never_quotes_it() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "berth.toml",
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\nsecrets = { api_key = sk_live_abc123 }\n",
        )?;
        let err = load(jail).unwrap_err().to_string();
        assert!(!err.contains("sk_live"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("berth.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn sizes_that_would_make_hyper_or_the_pool_allocate_without_bound_are_refused() {
    for (text, key) in [
        ("[server]\nmax_headers = 4000000000\n", "server.max_headers"),
        ("[server]\nmax_headers = 0\n", "server.max_headers"),
        (
            "[server]\nhttp2_max_streams = 0\n",
            "server.http2_max_streams",
        ),
        (
            "[server]\nhttp2_max_streams = 100000\n",
            "server.http2_max_streams",
        ),
        (
            "[server]\nmax_header_bytes = \"1GiB\"\n",
            "server.max_header_bytes",
        ),
        (
            "[runtime]\nmax_instances = 4000000000\n",
            "runtime.max_instances",
        ),
        (
            "[runtime]\nmax_instances = 10\ndecommit_batch = 11\n",
            "runtime.decommit_batch",
        ),
        (
            "[defaults.limits]\nmemory = \"1TiB\"\n",
            "defaults.limits.memory",
        ),
    ] {
        Jail::expect_with(|jail| {
            jail.create_file("berth.toml", text)?;
            let err = load(jail).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
            Ok(())
        });
    }
    Jail::expect_with(|jail| {
        jail.create_file("berth.toml", "[server]\nmax_headers = 1000\n")?;
        assert_eq!(load(jail).unwrap().server.max_headers, 1000);
        Ok(())
    });
}

#[test]
fn environment_values_are_strings_as_written() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "berth.toml",
            "[modules.a]\nfile = \"a.wasm\"\nroute = \"/a\"\n",
        )?;
        jail.set_env("BERTH_ADMIN__TOKEN", "000420");
        jail.set_env("BERTH_MODULES__A__CONFIG__VERSION", "1.10");
        jail.set_env("BERTH_MODULES__A__SECRETS__PIN", "0042");
        jail.set_env("BERTH_SERVER__MAX_HEADERS", "50");
        let cfg = load(jail).unwrap();
        assert_eq!(cfg.admin.token.unwrap().0.0, "000420");
        assert_eq!(cfg.modules["a"].config["version"].0, "1.10");
        assert_eq!(cfg.modules["a"].secrets["pin"].0.0, "0042");
        assert_eq!(cfg.server.max_headers, 50);
        // Typed keys read the text as their type, and name the variable
        // when it is not one.
        jail.set_env("BERTH_SHUTDOWN__DRAIN_DELAY", "0");
        assert_eq!(load(jail).unwrap().shutdown.drain_delay, Duration::ZERO);
        jail.set_env("BERTH_SERVER__MAX_HEADERS", "lots");
        let err = load(jail).unwrap_err().to_string();
        assert!(err.contains("BERTH_SERVER__MAX_HEADERS"), "{err}");
        Ok(())
    });
}

#[test]
fn a_secrets_file_keeps_the_case_of_its_keys_and_sets_only_secrets() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "berth.toml",
            "[modules.cfg]\nfile = \"a.wasm\"\nroute = \"/a\"\n",
        )?;
        jail.create_file(
            "secrets.toml",
            "[modules.cfg.secrets]\napiKey = \"s3cr3t\"\nPIN = \"0042\"\n[admin]\ntoken = \"t\"\n",
        )?;
        let with = |file: &str| Overrides {
            secrets_file: Some(jail.directory().join(file)),
            ..Overrides::default()
        };
        let cfg = Config::load(
            Some(&jail.directory().join("berth.toml")),
            &with("secrets.toml"),
        )
        .unwrap();
        let secrets = &cfg.modules["cfg"].secrets;
        assert_eq!(secrets["apiKey"].0.0, "s3cr3t");
        assert_eq!(secrets["PIN"].0.0, "0042");
        assert_eq!(cfg.admin.token.unwrap().0.0, "t");

        jail.create_file(
            "bad.toml",
            "[modules.cfg]\nroute = \"/stolen\"\n[modules.cfg.secrets]\nk = \"v\"\n",
        )?;
        let err = Config::load(
            Some(&jail.directory().join("berth.toml")),
            &with("bad.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad.toml") && err.contains("modules"), "{err}");
        for (file, text) in [
            (
                "reg.toml",
                "[registry]\ninsecure_registries = [\"evil:5000\"]\n",
            ),
            ("adm.toml", "[admin]\nlisten = \"0.0.0.0:1\"\n"),
            ("top.toml", "[server]\nmax_headers = 7\n"),
        ] {
            jail.create_file(file, text)?;
            let err = Config::load(Some(&jail.directory().join("berth.toml")), &with(file))
                .unwrap_err()
                .to_string();
            assert!(err.contains("may set only"), "{file}: {err}");
        }
        let err = Config::load(
            Some(&jail.directory().join("berth.toml")),
            &with("gone.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("gone.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn a_prebuilt_folder_is_absolute_and_a_compile_target_is_one_berth_knows() {
    for (text, key, why) in [
        (
            "[runtime]\nprebuilt_dir = \"prebuilt\"\n",
            "runtime.prebuilt_dir",
            "absolute",
        ),
        (
            "[runtime]\ncompile_target = \"x86-64-v4\"\n",
            "compile_target",
            "portable",
        ),
    ] {
        Jail::expect_with(|jail| {
            jail.create_file("berth.toml", text)?;
            let err = load(jail).unwrap_err().to_string();
            assert!(err.contains(key) && err.contains(why), "{text}: {err}");
            Ok(())
        });
    }
    Jail::expect_with(|jail| {
        jail.create_file(
            "berth.toml",
            "[runtime]\nprebuilt_dir = \"/opt/berth/prebuilt\"\ncompile_target = \"portable\"\n",
        )?;
        let config = load(jail).unwrap();
        assert_eq!(
            config.runtime.compile_target,
            super::CompileTarget::Portable
        );
        assert_eq!(
            config.runtime.prebuilt_dir.as_deref(),
            Some(std::path::Path::new("/opt/berth/prebuilt"))
        );
        Ok(())
    });
}
