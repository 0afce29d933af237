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

{{/* The Secret holding the admin token, if any. */}}
{{- define "berth.adminTokenSecret" -}}
{{- if .Values.admin.tokenSecret -}}
{{ .Values.admin.tokenSecret }}
{{- else if .Values.admin.token -}}
{{ include "berth.fullname" . }}-admin-token
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
{{- with $m.limits }}{{ $_ := set $entry "limits" . }}{{ end -}}
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
{{- $limits := dict "timeout" .Values.limits.timeout "memory" .Values.limits.memory "max_concurrency" (int .Values.limits.maxConcurrency) "max_body" .Values.limits.maxBody -}}
{{- $outbound := dict "connect_timeout" .Values.outbound.connectTimeout "timeout" .Values.outbound.timeout "retries" (int .Values.outbound.retries) -}}
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
