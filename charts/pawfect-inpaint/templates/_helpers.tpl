{{/* Chart name. */}}
{{- define "pawfect.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource-name prefix: <release>-<chart>, or <release> when it already holds the chart name. */}}
{{- define "pawfect.fullname" -}}
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

{{/* A name <fullname>-<suffix> that fits in 63 characters. Call with (list $ "suffix"). */}}
{{- define "pawfect.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 }}
{{- $prefix := include "pawfect.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $suffix }}
{{- end }}

{{- define "pawfect.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "pawfect.labels" -}}
helm.sh/chart: {{ include "pawfect.chart" . }}
app.kubernetes.io/name: {{ include "pawfect.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pawfect-inpaint
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of a component. Call with (list $ "operator"). */}}
{{- define "pawfect.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "pawfect.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Labels of a component's resources. Call with (list $ "operator"). */}}
{{- define "pawfect.componentLabels" -}}
{{ include "pawfect.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "pawfect.operator.fullname" -}}
{{- include "pawfect.componentName" (list . "operator") }}
{{- end }}

{{- define "pawfect.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pawfect.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Leader election: asked for, or implied by more than one replica. */}}
{{- define "pawfect.leaderElection" -}}
{{- if or .Values.operator.leaderElection.enabled (gt (int .Values.operator.replicas) 1) }}true{{- end }}
{{- end }}

{{- define "pawfect.redis.fullname" -}}
{{- include "pawfect.componentName" (list . "redis") }}
{{- end }}

{{/* Redis URL of the operator and the workers (no password in it). */}}
{{- define "pawfect.redis.url" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc:%d/0" (include "pawfect.redis.fullname" .) .Release.Namespace (int .Values.redis.service.port) }}
{{- else }}
{{- required "externalRedis.url is required when redis.enabled is false" .Values.externalRedis.url }}
{{- end }}
{{- end }}

{{/* Secret holding the Redis password; empty when there is none. */}}
{{- define "pawfect.redis.secretName" -}}
{{- if .Values.redis.enabled }}
{{- default (include "pawfect.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- else }}
{{- .Values.externalRedis.existingSecret }}
{{- end }}
{{- end }}

{{- define "pawfect.redis.secretKey" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretPasswordKey }}{{ else }}redis-password{{ end }}
{{- else }}
{{- .Values.externalRedis.existingSecretPasswordKey }}
{{- end }}
{{- end }}

{{- define "pawfect.models.claimName" -}}
{{- if .Values.models.persistence.existingClaim }}
{{- .Values.models.persistence.existingClaim }}
{{- else if .Values.models.persistence.enabled }}
{{- include "pawfect.componentName" (list . "models") }}
{{- end }}
{{- end }}

{{/* The ConfigMap that carries the default InpaintPool's manifest (see pool.yaml). */}}
{{- define "pawfect.pool.configMapName" -}}
{{- include "pawfect.componentName" (list . "default-pool") }}
{{- end }}

{{/* An image reference: repository:tag, or repository:tag@digest when a digest is given (the
kubelet then pulls by digest). Call with (list $image $defaultTag). */}}
{{- define "pawfect.image" -}}
{{- $image := index . 0 }}
{{- $ref := printf "%s:%s" $image.repository (default (index . 1) $image.tag) }}
{{- if $image.digest }}
{{- $ref = printf "%s@%s" $ref $image.digest }}
{{- end }}
{{- $ref }}
{{- end }}

{{- define "pawfect.worker.image" -}}
{{- include "pawfect.image" (list .Values.pool.worker.image .Chart.AppVersion) }}
{{- end }}

{{- define "pawfect.operator.image" -}}
{{- include "pawfect.image" (list .Values.operator.image .Chart.AppVersion) }}
{{- end }}

{{- define "pawfect.redis.image" -}}
{{- include "pawfect.image" (list .Values.redis.image .Values.redis.image.tag) }}
{{- end }}

{{/* Name of the leader-election Lease: one per release. */}}
{{- define "pawfect.leaseName" -}}
{{- include "pawfect.operator.fullname" . }}
{{- end }}

{{/* Whether the chart creates the Redis password Secret itself. */}}
{{- define "pawfect.redis.chartSecret" -}}
{{- if and .Values.redis.enabled (not .Values.redis.auth.existingSecret) }}true{{- end }}
{{- end }}

{{/*
The password of the chart's own Redis Secret: redis.auth.password, else the one an earlier install
stored, else a new random one. Remembered for the rest of the render, so that the Secret and the
checksum annotations of the pods that read it agree.
*/}}
{{- define "pawfect.redis.password" -}}
{{- if not (hasKey .Values.redis.auth "__resolvedPassword") }}
{{- $password := .Values.redis.auth.password }}
{{- if not $password }}
{{- /* Keep the password of an earlier install across upgrades. */}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "pawfect.redis.fullname" .) }}
{{- if and $existing $existing.data (index $existing.data "redis-password") }}
{{- $password = index $existing.data "redis-password" | b64dec }}
{{- else }}
{{- $password = randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- $_ := set .Values.redis.auth "__resolvedPassword" $password }}
{{- end }}
{{- index .Values.redis.auth "__resolvedPassword" }}
{{- end }}

{{/* Pod annotation that changes when the chart's Redis password changes (a restart then reads
the new one); empty for an existing Secret, whose content the chart does not know. */}}
{{- define "pawfect.redis.secretChecksum" -}}
{{- if include "pawfect.redis.chartSecret" . }}
checksum/redis-secret: {{ printf "%s/%s/%s" .Release.Namespace (include "pawfect.redis.fullname" .) (include "pawfect.redis.password" .) | sha256sum }}
{{- end }}
{{- end }}

{{/* Checks that values which depend on each other agree (the schema checks each on its own). */}}
{{- define "pawfect.validate" -}}
{{- if and .Values.redis.enabled .Values.externalRedis.url }}
{{- fail "set either redis.enabled (the bundled Redis) or externalRedis.url, not both" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.url) }}
{{- fail "externalRedis.url is required when redis.enabled is false" }}
{{- end }}
{{- with .Values.externalRedis.ca }}
{{- if and .configMap .secret }}
{{- fail "externalRedis.ca: name a configMap or a secret, not both" }}
{{- end }}
{{- if and (or .configMap .secret) (not (hasPrefix "rediss://" $.Values.externalRedis.url)) }}
{{- fail "externalRedis.ca is for a rediss:// (TLS) externalRedis.url" }}
{{- end }}
{{- end }}
{{- if and .Values.pool.create (lt (int .Values.pool.maxReplicas) (int .Values.pool.minReplicas)) }}
{{- fail "pool.minReplicas must not exceed pool.maxReplicas" }}
{{- end }}
{{- if and .Values.models.download.enabled (not (include "pawfect.models.claimName" .)) }}
{{- fail "models.download needs a model volume: set models.persistence.enabled or models.persistence.existingClaim" }}
{{- end }}
{{- if and .Values.pool.create (not (include "pawfect.models.claimName" .)) }}
{{- fail "the default pool needs a model volume: set models.persistence.enabled or models.persistence.existingClaim (or pool.create=false)" }}
{{- end }}
{{- if and .Values.operator.podDisruptionBudget.enabled (le (int .Values.operator.replicas) 1) }}
{{- fail "operator.podDisruptionBudget needs operator.replicas > 1 (with one replica it would block every node drain)" }}
{{- end }}
{{- if and .Values.operator.podDisruptionBudget.enabled (ge (int .Values.operator.podDisruptionBudget.minAvailable) (int .Values.operator.replicas)) }}
{{- fail "operator.podDisruptionBudget.minAvailable must be less than operator.replicas (else no operator pod may ever be evicted)" }}
{{- end }}
{{- if and .Values.pool.create .Values.operator.watchNamespace (ne .Values.operator.watchNamespace .Release.Namespace) }}
{{- fail (printf "the default pool lives in the release namespace %s, which the operator does not watch (operator.watchNamespace=%s): set pool.create=false or watch the release namespace" .Release.Namespace .Values.operator.watchNamespace) }}
{{- end }}
{{- end }}

{{/* Whether a Redis CA is mounted (externalRedis.ca names a ConfigMap or Secret). */}}
{{- define "pawfect.redis.ca" -}}
{{- if and (not .Values.redis.enabled) (or .Values.externalRedis.ca.configMap .Values.externalRedis.ca.secret) }}true{{- end }}
{{- end }}

{{/* The pod volume of the Redis CA (its key mounted as ca.crt). */}}
{{- define "pawfect.redis.caVolume" -}}
{{- $ca := .Values.externalRedis.ca -}}
- name: redis-ca
  {{- if $ca.configMap }}
  configMap:
    name: {{ $ca.configMap }}
  {{- else }}
  secret:
    secretName: {{ $ca.secret }}
  {{- end }}
    items:
      - key: {{ $ca.key }}
        path: ca.crt
{{- end }}

{{/* The container's mount of the Redis CA volume. */}}
{{- define "pawfect.redis.caMount" -}}
- name: redis-ca
  mountPath: /etc/pawfect/redis-ca
  readOnly: true
{{- end }}
