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
{{- $cfg := dict
  "server" (dict "listen" (printf "0.0.0.0:%d" (int .Values.server.port)))
  "admin" $admin
  "runtime" (dict "modules_dir" "/modules" "cache_dir" "/var/cache/berth/compiled" "cache_max_size" "200MiB")
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
