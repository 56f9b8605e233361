{{/* Chart name. */}}
{{- define "tollgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, suffixed with the chart name unless it contains it. */}}
{{- define "tollgate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tollgate.operatorName" -}}{{ include "tollgate.fullname" . | trunc 54 | trimSuffix "-" }}-operator{{- end }}
{{- define "tollgate.gatewayName" -}}{{ include "tollgate.fullname" . | trunc 55 | trimSuffix "-" }}-gateway{{- end }}
{{- define "tollgate.redisName" -}}{{ include "tollgate.fullname" . | trunc 57 | trimSuffix "-" }}-redis{{- end }}

{{/* Labels on every object. */}}
{{- define "tollgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tollgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tollgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (operator, gateway, redis). */}}
{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tollgate.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image reference: repository and tag (default: appVersion). */}}
{{- define "tollgate.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Namespaces the operator watches. */}}
{{- define "tollgate.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}{{ join "," .Values.watchNamespaces }}{{ else }}{{ .Release.Namespace }}{{ end }}
{{- end }}

{{/* Whether the operator watches every namespace. */}}
{{- define "tollgate.clusterWide" -}}
{{- if has "*" .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* Name and key of the Secret holding the Redis URL, when Redis is used. */}}
{{- define "tollgate.redisSecretName" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}{{ .Values.redis.external.existingSecret }}{{ else }}{{ include "tollgate.fullname" . }}-redis-url{{ end }}
{{- end }}
{{- define "tollgate.redisSecretKey" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}{{ .Values.redis.external.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/* The bundled Redis password: the chart's generated Secret or an existing one. */}}
{{- define "tollgate.redisAuthSecretName" -}}
{{- if .Values.redis.bundled.auth.existingSecret }}{{ .Values.redis.bundled.auth.existingSecret }}{{ else }}{{ include "tollgate.fullname" . }}-redis-auth{{ end }}
{{- end }}
{{- define "tollgate.redisAuthEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "tollgate.redisAuthSecretName" .root }}
      key: {{ .root.Values.redis.bundled.auth.existingSecretKey }}
{{- end }}

{{/* Environment shared by the gateway and the operator to reach Redis. */}}
{{- define "tollgate.redisEnv" -}}
{{- if ne .Values.redis.mode "none" }}
- name: TOLLGATE_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tollgate.redisSecretName" . }}
      key: {{ include "tollgate.redisSecretKey" . }}
{{- if eq .Values.redis.mode "bundled" }}
{{ include "tollgate.redisAuthEnv" (dict "root" . "name" "TOLLGATE_REDIS_PASSWORD") }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.cluster }}
- name: TOLLGATE_REDIS_CLUSTER
  value: "true"
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.caSecret }}
- name: TOLLGATE_REDIS_CA_FILE
  value: /etc/tollgate/redis-ca/ca.crt
{{- end }}
{{- end }}
{{- end }}

{{/* The gateway's Redis for the response cache, when it has its own. */}}
{{- define "tollgate.redisCacheEnv" -}}
{{- $e := .Values.redis.external }}
{{- if or (eq .Values.redis.mode "bundled") (and (eq .Values.redis.mode "external") (or (and $e.existingSecret $e.existingSecretCacheKey) (and (not $e.existingSecret) $e.cacheUrl))) }}
- name: TOLLGATE_REDIS_CACHE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "tollgate.redisSecretName" . }}
      key: {{ if and (eq .Values.redis.mode "external") $e.existingSecret }}{{ $e.existingSecretCacheKey }}{{ else }}cacheUrl{{ end }}
{{- end }}
{{- end }}

{{/* Volume and mount for the Redis CA bundle, when configured. */}}
{{- define "tollgate.redisCaVolume" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.redis.external.caSecret }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}
{{- define "tollgate.redisCaMount" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.caSecret }}
- name: redis-ca
  mountPath: /etc/tollgate/redis-ca
  readOnly: true
{{- end }}
{{- end }}

{{/* Seconds a duration such as 30s, 2m or 500ms stands for (rounded up). */}}
{{- define "tollgate.seconds" -}}
{{- $d := toString . }}
{{- if hasSuffix "ms" $d }}{{ div (add (trimSuffix "ms" $d | int) 999) 1000 }}
{{- else if hasSuffix "s" $d }}{{ trimSuffix "s" $d | int }}
{{- else if hasSuffix "m" $d }}{{ mul (trimSuffix "m" $d | int) 60 }}
{{- else if hasSuffix "h" $d }}{{ mul (trimSuffix "h" $d | int) 3600 }}
{{- else }}{{ fail (printf "%q is not a duration such as 30s or 2m" $d) }}
{{- end }}
{{- end }}
