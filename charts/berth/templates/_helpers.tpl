{{/* Names and labels shared by every resource. */}}
{{- define "berth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "berth.fullname" -}}
{{- if contains (include "berth.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "berth.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "berth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The application the pods serve (label `app`): one for both releases of
a blue/green pair, so a Service can move between them by `track`. */}}
{{- define "berth.app" -}}
{{- default .Release.Name .Values.app | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels of the chart's `helm test` pod, which the NetworkPolicy of
every release of the app admits to the traffic port. */}}
{{- define "berth.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "berth.name" . }}
app.kubernetes.io/component: test
app: {{ include "berth.app" . }}
{{- end }}

{{- define "berth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "berth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "berth.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* The name of this release's track (Deployment, HPA, ScaledObject),
within the 63 characters of a label value: KEDA labels the objects it
makes with the ScaledObject's name. */}}
{{- define "berth.trackName" -}}
{{- printf "%s-%s" (include "berth.fullname" .) .Values.track | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A duration of values (`90s`, `1m`, `2h`) in seconds. */}}
{{- define "berth.seconds" -}}
{{- $n := regexFind "^[0-9]+" . | int -}}
{{- if hasSuffix "ms" . }}0{{ else if hasSuffix "h" . }}{{ mul $n 3600 }}{{ else if hasSuffix "m" . }}{{ mul $n 60 }}{{ else }}{{ $n }}{{ end -}}
{{- end }}

{{/* The headless Service naming every pod of this release's track. */}}
{{- define "berth.podsService" -}}
{{- printf "%s-%s-pods" (include "berth.fullname" .) .Values.track | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret holding the admin token, if any. */}}
{{- define "berth.adminTokenSecret" -}}
{{- if .Values.admin.tokenSecret -}}
{{ .Values.admin.tokenSecret }}
{{- else if .Values.admin.token -}}
{{ include "berth.fullname" . }}-admin-token
{{- end -}}
{{- end }}

{{/* Values in camelCase (limits, instances, outbound) set into `out` under
berth's snake_case keys, nested tables too. Helm reads the numbers of a
values file as float64, which berth refuses where it wants an integer:
whole numbers are set as integers (a share such as retryBudget: 0.2 stays
a float). Sprig's snakecase splits digits off (`h2c` would be `h_2c`,
which berth refuses), so only capitals start a new word here. Called as
(dict "in" VALUES "out" DICT); renders nothing. */}}
{{- define "berth.hostKeys" -}}
{{- range $key, $value := .in -}}
{{- $hostKey := regexReplaceAll "([A-Z])" $key "_${1}" | lower -}}
{{- if kindIs "map" $value -}}
{{- $table := dict -}}
{{- include "berth.hostKeys" (dict "in" $value "out" $table) -}}
{{- $_ := set $.out $hostKey $table -}}
{{- else if and (kindIs "float64" $value) (eq $value (floor $value)) -}}
{{- $_ := set $.out $hostKey (int64 $value) -}}
{{- else -}}
{{- $_ := set $.out $hostKey $value -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* berth.toml, rendered from values. */}}
{{- define "berth.config" -}}
{{- $modules := dict -}}
{{- range $name, $m := .Values.modules -}}
{{- if $m -}}
{{- $entry := dict "route" $m.route -}}
{{- if $m.oci -}}
{{- $_ := set $entry "oci" $m.oci -}}
{{- if $m.allowTags }}{{ $_ := set $entry "allow_tags" true }}{{ end -}}
{{- else if $m.url -}}
{{- $_ := set $entry "url" $m.url -}}
{{- else -}}
{{- $_ := set $entry "file" (default (printf "%s.wasm" $name) $m.file) -}}
{{- end -}}
{{- with $m.sha256 }}{{ $_ := set $entry "sha256" . }}{{ end -}}
{{- with $m.config }}{{ $_ := set $entry "config" . }}{{ end -}}
{{- with $m.allowedOutboundHosts }}{{ $_ := set $entry "allowed_outbound_hosts" . }}{{ end -}}
{{- range $section := list "limits" "instances" "outbound" -}}
{{- with get $m $section -}}
{{- $table := dict -}}
{{- include "berth.hostKeys" (dict "in" . "out" $table) -}}
{{- $_ := set $entry $section $table -}}
{{- end -}}
{{- end -}}
{{- /* A canary: camelCase values to berth's keys, integers kept integers. */ -}}
{{- with $m.canary -}}
{{- $cv := . -}}
{{- $c := dict -}}
{{- if $cv.oci -}}
{{- $_ := set $c "oci" $cv.oci -}}
{{- if $cv.allowTags }}{{ $_ := set $c "allow_tags" true }}{{ end -}}
{{- else if $cv.url -}}
{{- $_ := set $c "url" $cv.url -}}
{{- else if $cv.file -}}
{{- $_ := set $c "file" $cv.file -}}
{{- end -}}
{{- with $cv.sha256 }}{{ $_ := set $c "sha256" . }}{{ end -}}
{{- if $cv.steps -}}
{{- $steps := list -}}
{{- range $cv.steps }}{{ $steps = append $steps (int .) }}{{ end -}}
{{- $_ := set $c "steps" $steps -}}
{{- end -}}
{{- with $cv.interval }}{{ $_ := set $c "interval" . }}{{ end -}}
{{- if hasKey $cv "minSuccessRate" }}{{ $_ := set $c "min_success_rate" (float64 $cv.minSuccessRate) }}{{ end -}}
{{- with $cv.maxP99 }}{{ $_ := set $c "max_p99" . }}{{ end -}}
{{- with $cv.maxP99Ratio }}{{ $_ := set $c "max_p99_ratio" (float64 .) }}{{ end -}}
{{- with $cv.maxFailures }}{{ $_ := set $c "max_failures" (int .) }}{{ end -}}
{{- with $cv.minRequests }}{{ $_ := set $c "min_requests" (int .) }}{{ end -}}
{{- with $cv.sticky }}{{ $_ := set $c "sticky" . }}{{ end -}}
{{- /* Fleet analysis: this release's series (as the autoscaling
queries select them) unless the values name other labels. */ -}}
{{- with $cv.analysis -}}
{{- $a := dict "prometheus" .prometheus "labels" (default (fromYaml (include "berth.seriesLabels" $)) .labels) -}}
{{- with .scrapeInterval }}{{ $_ := set $a "scrape_interval" . }}{{ end -}}
{{- with .bearerTokenFile }}{{ $_ := set $a "bearer_token_file" . }}{{ end -}}
{{- with .rollbackAfterUnavailable }}{{ $_ := set $a "rollback_after_unavailable" . }}{{ end -}}
{{- $_ := set $c "analysis" $a -}}
{{- end -}}
{{- $_ := set $entry "canary" $c -}}
{{- end -}}
{{- $_ := set $modules $name $entry -}}
{{- end -}}
{{- end -}}
{{- $limits := dict -}}
{{- include "berth.hostKeys" (dict "in" .Values.limits "out" $limits) -}}
{{- $outbound := dict -}}
{{- include "berth.hostKeys" (dict "in" .Values.outbound "out" $outbound) -}}
{{- /* Module pulls: the imagePullSecrets (mounted as files by the
Deployment) give the credentials, the CA Secret the extra roots. */ -}}
{{- $authFiles := list -}}
{{- if include "berth.usesOci" . -}}
{{- range .Values.imagePullSecrets -}}
{{- $authFiles = append $authFiles (printf "/var/run/secrets/berth/registry/%s/config.json" .name) -}}
{{- end -}}
{{- end -}}
{{- $registry := dict "auth_files" $authFiles "insecure_registries" .Values.registry.insecureRegistries "timeout" .Values.registry.timeout "retries" (int .Values.registry.retries) -}}
{{- if .Values.registry.caSecret }}{{ $_ := set $registry "ca_file" "/var/run/secrets/berth/registry-ca/ca.crt" }}{{ end -}}
{{- $admin := dict "listen" (printf "0.0.0.0:%d" (int .Values.admin.port)) -}}
{{- if include "berth.adminTokenSecret" . }}{{ $_ := set $admin "token_file" "/var/run/secrets/berth/token" }}{{ end -}}
{{- $_ := set $admin "peers" (printf "%s.%s.svc:%d" (include "berth.podsService" .) .Release.Namespace (int .Values.admin.port)) -}}
{{- $runtime := dict "modules_dir" "/modules" "cache_dir" "/var/cache/berth/compiled" "cache_max_size" "200MiB" "compile_target" .Values.compiled.target -}}
{{- if .Values.compiled.prebuiltDir }}{{ $_ := set $runtime "prebuilt_dir" .Values.compiled.prebuiltDir }}{{ end -}}
{{- $cfg := dict
  "server" (dict "listen" (printf "0.0.0.0:%d" (int .Values.server.port)))
  "admin" $admin
  "runtime" $runtime
  "shutdown" (dict "drain_delay" (printf "%ds" (int .Values.shutdown.drainDelaySeconds)) "grace_period" (printf "%ds" (int .Values.shutdown.gracePeriodSeconds)))
  "log" (dict "access_log" .Values.log.accessLog)
  "defaults" (dict "limits" $limits "outbound" $outbound)
  "modules" $modules
  "registry" $registry
-}}
{{- toToml $cfg -}}
{{- end }}

{{/* Whether any module is pulled from an OCI registry. */}}
{{- define "berth.usesOci" -}}
{{- range $name, $m := .Values.modules -}}{{ if and $m $m.oci }}true{{ end }}{{- end -}}
{{- end }}

{{/* The route of the first module (modules set to null are gone). */}}
{{- define "berth.firstRoute" -}}
{{- $routes := list -}}
{{- range $name, $m := .Values.modules -}}{{ if $m }}{{ $routes = append $routes $m.route }}{{ end }}{{- end -}}
{{- first $routes | default "/" -}}
{{- end }}

{{/* The names of the modules served. */}}
{{- define "berth.moduleNames" -}}
{{- $names := list -}}
{{- range $name, $m := .Values.modules -}}{{ if $m }}{{ $names = append $names $name }}{{ end }}{{- end -}}
{{- $names | join ", " -}}
{{- end }}

{{/* Autoscaling on Berth's own signals. Each signal: the series it reads,
whether it counts (and is read as a rate), and the name prometheus-adapter
serves it under (not the series' own, which the adapter's default rules
may already serve in another form). */}}
{{- define "berth.autoscaling.signals" -}}
inFlight:
  series: berth_http_server_active_requests
  rate: false
  metric: berth_in_flight_requests
  trigger: in-flight
requestRate:
  series: berth_http_server_requests_total
  rate: true
  metric: berth_requests_per_second
  trigger: request-rate
shedRate:
  series: berth_http_server_shed_requests_total
  rate: true
  metric: berth_shed_requests_per_second
  trigger: shed-rate
{{- end }}

{{/* The pod labels the series of this release's pods carry: the labels
that select its pods, which the PodMonitor copies onto every series
(podTargetLabels; a scrape job of annotations with
`labelmap: __meta_kubernetes_pod_label_(.+)` copies them too). The track
is copied as `berth.dev/track`, not `track`: Berth's series have a `track`
label of their own (stable, canary), which a target label of that name
would rename to `exported_track`. */}}
{{- define "berth.autoscaling.podLabels" -}}
{{ include "berth.selectorLabels" . }}
berth.dev/track: {{ .Values.track }}
{{- end }}

{{/* The same as matchers' label names and values (YAML): the namespace and
each pod label under Prometheus' name for it (`app.kubernetes.io/name` is
`app_kubernetes_io_name`). What selects this release's series: the
autoscaling queries and a fleet canary's analysis by default. */}}
{{- define "berth.seriesLabels" -}}
{{- $labels := dict "namespace" .Release.Namespace -}}
{{- range $name, $value := fromYaml (include "berth.autoscaling.podLabels" .) -}}
{{- $_ := set $labels (regexReplaceAll "[^a-zA-Z0-9_]" $name "_") $value -}}
{{- end -}}
{{- toYaml $labels -}}
{{- end }}

{{/* The series of this release's track, as label matchers: its namespace
and the pod labels above. Neither another release, nor another track of
this app, nor a namespace next door matches. */}}
{{- define "berth.autoscaling.selector" -}}
{{- $matchers := list -}}
{{- range $name, $value := fromYaml (include "berth.seriesLabels" .) -}}
{{- $matchers = append $matchers (printf "%s=%s" $name (quote $value)) -}}
{{- end -}}
{{- join "," $matchers -}}
{{- end }}

{{/* The PromQL of one signal, the one query KEDA and prometheus-adapter
both run: summed over the series `selector` picks, by `by` (KEDA: one
figure for the track, ""; the adapter: one per pod, its <<.GroupBy>>).
A pod Prometheus scrapes that has no series of the signal yet (no request
counted since it started) counts as 0 through berth_ready, which every pod
has from its first scrape; a track with no pod scraped at all gives no
value rather than 0, so a selector that matches nothing is an error to the
autoscaler (which then keeps the replicas it has), not a quiet scale-down.
Sums only: nothing divides, so no pod count of 0 makes NaN. Called as
(dict "signal" NAME "series" SERIES "selector" MATCHERS "by" LABELS
"window" RANGE); SERIES is the signal's series, or the adapter's
<<.Series>>. */}}
{{- define "berth.autoscaling.query" -}}
{{- $signal := get (fromYaml (include "berth.autoscaling.signals" .)) .signal -}}
{{- $sum := ternary "sum" (printf "sum by (%s) " .by) (eq .by "") -}}
{{- $value := printf "%s{%s}" .series .selector -}}
{{- if $signal.rate }}{{ $value = printf "rate(%s[%s])" $value .window }}{{ end -}}
{{ $sum }}({{ $value }}) or {{ $sum }}(0 * berth_ready{{ "{" }}{{ .selector }}})
{{- end }}

{{/* The signals given a target (autoscaling.signals), by name. */}}
{{- define "berth.autoscaling.targets" -}}
{{- $targets := dict -}}
{{- range $name, $target := .Values.autoscaling.signals -}}
{{- if and (ne $name "rateWindow") (not (kindIs "invalid" $target)) }}{{ $_ := set $targets $name $target }}{{ end -}}
{{- end -}}
{{- toYaml $targets -}}
{{- end }}

{{/* A target as the number KEDA's threshold and an HPA quantity both
read: 20, 0.5, 2.5 (Helm reads a values file's numbers as float64). */}}
{{- define "berth.autoscaling.number" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end }}

{{/* What JSON schema cannot compare: the replica bounds. */}}
{{- define "berth.autoscaling.check" -}}
{{- $a := .Values.autoscaling -}}
{{- /* rate() needs two samples in its window, or the fallback reads 0:
a silent scale-down. Four scrapes, as Prometheus advises. */ -}}
{{- if and .Values.podMonitor.enabled (or $a.signals.requestRate $a.signals.shedRate) -}}
{{- $window := include "berth.seconds" $a.signals.rateWindow | int -}}
{{- $scrape := include "berth.seconds" .Values.podMonitor.interval | int -}}
{{- if lt $window (mul 4 $scrape) -}}
{{- fail (printf "autoscaling.signals.rateWindow (%s) must span at least four scrapes of podMonitor.interval (%s): with fewer, a rate reads 0 and the autoscaler scales down" $a.signals.rateWindow .Values.podMonitor.interval) -}}
{{- end -}}
{{- end -}}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) -}}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- end -}}
{{- with $a.keda.fallback -}}
{{- if or (lt (int .replicas) (int $a.minReplicas)) (gt (int .replicas) (int $a.maxReplicas)) -}}
{{- fail (printf "autoscaling.keda.fallback.replicas (%d) is outside minReplicas..maxReplicas (%d..%d)" (int .replicas) (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- end }}
