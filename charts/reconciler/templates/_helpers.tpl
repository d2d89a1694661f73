{{/*
Names, labels, the shared pod pieces, and the named templates a workload chart uses
to add the daemon as a sidecar. Every template here takes a chart root context: this
chart's `.` or, from a parent chart that depends on this one, `.Subcharts.reconciler`.
*/}}

{{- define "reconciler.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "reconciler.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "reconciler.managerName" -}}{{ include "reconciler.fullname" . }}-manager{{- end -}}
{{- define "reconciler.daemonName" -}}{{ include "reconciler.fullname" . }}-daemon{{- end -}}
{{- define "reconciler.sidecarConfigName" -}}{{ include "reconciler.fullname" . }}-daemon-sidecar{{- end -}}
{{- define "reconciler.nodeConfigName" -}}{{ include "reconciler.fullname" . }}-daemon-node{{- end -}}

{{- define "reconciler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "reconciler.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "reconciler.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Labels on every object; pass (dict "ctx" . "component" "manager"). */}}
{{- define "reconciler.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "reconciler.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: reconciler
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "reconciler.selectorLabels" -}}
app.kubernetes.io/name: {{ include "reconciler.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* True (non-empty) when the gRPC link runs over mTLS. */}}
{{- define "reconciler.mtls" -}}
{{- if eq .Values.tls.mode "mtls" }}true{{ end -}}
{{- end -}}

{{/* Where gRPC servers listen: every interface with mTLS, loopback when insecure. */}}
{{- define "reconciler.listenHost" -}}
{{- if include "reconciler.mtls" . }}0.0.0.0{{ else }}127.0.0.1{{ end -}}
{{- end -}}

{{- define "reconciler.managerAddress" -}}
{{- if .Values.daemon.managerAddress -}}
{{- .Values.daemon.managerAddress -}}
{{- else if and .Values.manager.enabled (include "reconciler.mtls" .) -}}
{{- printf "%s.%s.svc:%d" (include "reconciler.managerName" .) .Release.Namespace (int .Values.manager.service.grpcPort) -}}
{{- end -}}
{{- end -}}

{{- define "reconciler.telemetry" -}}
telemetry:
  {{- if .Values.telemetry.otlpEndpoint }}
  exporter: otlp
  otlp_endpoint: {{ .Values.telemetry.otlpEndpoint | quote }}
  {{- else }}
  exporter: none
  otlp_endpoint: ""
  {{- end }}
logging:
  format: {{ .Values.logging.format }}
  level: {{ .Values.logging.level }}
{{- end -}}

{{/* The tls section of a config file; pass (dict "ctx" . "secret" NAME). */}}
{{- define "reconciler.tlsSettings" -}}
tls:
  {{- if include "reconciler.mtls" .ctx }}
  mode: mtls
  ca_file: /etc/reconciler/tls/ca.crt
  cert_file: /etc/reconciler/tls/tls.crt
  key_file: /etc/reconciler/tls/tls.key
  {{- else }}
  mode: insecure
  ca_file: ""
  cert_file: ""
  key_file: ""
  {{- end }}
{{- end -}}

{{- define "reconciler.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "reconciler.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
gRPC health probes (grpc.health.v1) through the image's reconciler-healthcheck, an
exec probe: the kubelet's built-in gRPC probe can neither present a client
certificate (mTLS) nor reach a loopback-only listener (insecure mode).
Pass (dict "ctx" . "port" N).
*/}}
{{- define "reconciler.grpcProbes" -}}
{{- $cmd := list "reconciler-healthcheck" (printf "127.0.0.1:%d" (int .port)) -}}
{{- if include "reconciler.mtls" .ctx -}}
{{- $cmd = concat $cmd (list "--tls-dir" "/etc/reconciler/tls") -}}
{{- end -}}
livenessProbe:
  exec:
    command: {{ toJson $cmd }}
  initialDelaySeconds: 5
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  exec:
    command: {{ toJson $cmd }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* ---------------------------------------------------------------------------
The daemon as a sidecar. In your pod spec:

  containers:
    - name: my-agent
      image: ...
      command: ["agentlet", "run", "--", "/usr/bin/my-agent"]
      env:
        {{- include "reconciler.agentEnv" .Subcharts.reconciler | nindent 8 }}
      volumeMounts:
        {{- include "reconciler.agentVolumeMounts" .Subcharts.reconciler | nindent 8 }}
    {{- include "reconciler.daemonSidecar" .Subcharts.reconciler | nindent 4 }}
  volumes:
    {{- include "reconciler.daemonSidecarVolumes" .Subcharts.reconciler | nindent 4 }}
--------------------------------------------------------------------------- */}}

{{/* The emptyDir both containers mount at /run/reconciler for the heartbeat socket. */}}
{{- define "reconciler.socketVolumeName" -}}reconciler-run{{- end -}}
{{- define "reconciler.socketDir" -}}/run/reconciler{{- end -}}
{{- define "reconciler.socketPath" -}}/run/reconciler/heartbeat.sock{{- end -}}

{{- define "reconciler.agentEnv" -}}
- name: RECONCILER_AGENT_ID
  value: {{ .Values.sidecar.agentId | quote }}
- name: RECONCILER_HEARTBEAT_SOCKET
  value: {{ include "reconciler.socketPath" . | quote }}
- name: RECONCILER_HEARTBEAT_INTERVAL_S
  value: {{ .Values.sidecar.heartbeatIntervalS | toString | quote }}
{{- end -}}

{{- define "reconciler.agentVolumeMounts" -}}
- name: {{ include "reconciler.socketVolumeName" . }}
  mountPath: {{ include "reconciler.socketDir" . }}
{{- end -}}

{{- define "reconciler.daemonEnv" -}}
- name: RECONCILER_LOGGING__FORMAT
  value: {{ .Values.logging.format | quote }}
{{- with .Values.daemon.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The daemon container; pass a root context and the node-id field to use. */}}
{{- define "reconciler.daemonContainer" -}}
- name: reconciler-daemon
  image: {{ include "reconciler.image" .ctx | quote }}
  imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
  args: ["daemon", "--config", "/etc/reconciler/config.yaml"]
  env:
    - name: RECONCILER_NODE__ID
      valueFrom:
        fieldRef:
          fieldPath: {{ .nodeIdField }}
    {{- if include "reconciler.mtls" .ctx }}
    {{- /* The Manager dials the pod IP: a pod's host name resolves nowhere else. */}}
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: RECONCILER_GRPC__ADVERTISE_ADDRESS
      value: "$(POD_IP)"
    {{- end }}
    {{- include "reconciler.daemonEnv" .ctx | nindent 4 }}
  ports:
    - name: grpc
      containerPort: {{ .ctx.Values.daemon.grpcPort }}
      protocol: TCP
    - name: metrics
      containerPort: {{ .ctx.Values.daemon.metricsPort }}
      protocol: TCP
  {{- include "reconciler.grpcProbes" (dict "ctx" .ctx "port" .ctx.Values.daemon.grpcPort) | nindent 2 }}
  resources:
    {{- toYaml .ctx.Values.daemon.resources | nindent 4 }}
  securityContext:
    {{- include "reconciler.containerSecurityContext" .ctx | nindent 4 }}
  volumeMounts:
    - name: reconciler-daemon-config
      mountPath: /etc/reconciler/config.yaml
      subPath: config.yaml
      readOnly: true
    {{- if include "reconciler.mtls" .ctx }}
    - name: reconciler-daemon-tls
      mountPath: /etc/reconciler/tls
      readOnly: true
    {{- end }}
    - name: {{ include "reconciler.socketVolumeName" .ctx }}
      mountPath: {{ include "reconciler.socketDir" .ctx }}
    - name: reconciler-daemon-state
      mountPath: /var/lib/reconciler
    - name: reconciler-tmp
      mountPath: /tmp
{{- end -}}

{{- define "reconciler.daemonVolumes" -}}
- name: reconciler-daemon-config
  configMap:
    name: {{ .configName }}
{{- if include "reconciler.mtls" .ctx }}
- name: reconciler-daemon-tls
  secret:
    secretName: {{ .ctx.Values.tls.daemonSecretName }}
    defaultMode: 0440
{{- end }}
- name: {{ include "reconciler.socketVolumeName" .ctx }}
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: reconciler-daemon-state
  emptyDir: {}
- name: reconciler-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{- define "reconciler.daemonSidecar" -}}
{{ include "reconciler.daemonContainer" (dict "ctx" . "nodeIdField" "metadata.name") }}
{{- end -}}

{{- define "reconciler.daemonSidecarVolumes" -}}
{{ include "reconciler.daemonVolumes" (dict "ctx" . "configName" (include "reconciler.sidecarConfigName" .)) }}
{{- end -}}

{{/* The daemon's config.yaml; pass (dict "ctx" . "allowUnmanaged" BOOL). */}}
{{- define "reconciler.daemonConfig" -}}
{{- $v := .ctx.Values -}}
{{- $host := include "reconciler.listenHost" .ctx -}}
{{- $base := printf `
state_dir: /var/lib/reconciler
grpc:
  listen: "%s:%d"
manager:
  address: %s
heartbeat:
  socket_path: %s
  http_listen: "127.0.0.1:7071"
  allow_unmanaged: %t
agents:
  allowed_commands: %s
  allow_root: %t
  stop_agents_on_exit: false
metrics:
  listen: "0.0.0.0:%d"
` $host (int $v.daemon.grpcPort) (include "reconciler.managerAddress" .ctx | quote) (include "reconciler.socketPath" .ctx | quote) .allowUnmanaged (toJson $v.daemon.agents.allowedCommands) $v.daemon.agents.allowRoot (int $v.daemon.metricsPort) | fromYaml -}}
{{- $base = mergeOverwrite $base (include "reconciler.tlsSettings" (dict "ctx" .ctx) | fromYaml) (include "reconciler.telemetry" .ctx | fromYaml) -}}
{{- toYaml (mergeOverwrite $base (deepCopy $v.daemon.settings)) -}}
{{- end -}}

{{/* The Manager's config.yaml. The PostgreSQL DSN comes from the environment. */}}
{{- define "reconciler.managerConfig" -}}
{{- $v := .Values -}}
{{- $base := printf `
state_dir: /var/lib/reconciler-manager
grpc:
  listen: "%s:%d"
store:
  backend: %s
  pool_size: %d
metrics:
  listen: "0.0.0.0:%d"
` (include "reconciler.listenHost" .) (int $v.manager.service.grpcPort) $v.manager.store.backend (int $v.manager.store.poolSize) (int $v.manager.service.metricsPort) | fromYaml -}}
{{- $base = mergeOverwrite $base (include "reconciler.tlsSettings" (dict "ctx" .) | fromYaml) (include "reconciler.telemetry" . | fromYaml) -}}
{{- toYaml (mergeOverwrite $base (deepCopy $v.manager.settings)) -}}
{{- end -}}

{{/* Cross-field rules, each failing with the values to change. */}}
{{- define "reconciler.validate" -}}
{{- $v := .Values -}}
{{- if and $v.manager.enabled (gt (int $v.manager.replicas) 1) (ne $v.manager.store.backend "postgres") -}}
{{- fail (printf "manager.replicas=%d needs manager.store.backend=postgres: SQLite is a file on one pod's disk, so replicas would each keep their own fleet. Set manager.store.backend=postgres and manager.store.postgres.existingSecret, or manager.replicas=1." (int $v.manager.replicas)) -}}
{{- end -}}
{{- if and $v.manager.enabled (eq $v.manager.store.backend "postgres") (not $v.manager.store.postgres.existingSecret) -}}
{{- fail "manager.store.backend=postgres needs manager.store.postgres.existingSecret: the name of a Secret whose key manager.store.postgres.secretKey holds the DSN." -}}
{{- end -}}
{{- if and (eq $v.tls.mode "insecure") (not $v.tls.insecureDevelopmentMode) -}}
{{- fail "tls.mode=insecure sends plaintext and binds every gRPC listener to loopback only; set tls.insecureDevelopmentMode=true to confirm this is a development install, or use tls.mode=mtls with tls.managerSecretName and tls.daemonSecretName." -}}
{{- end -}}
{{- if and (eq $v.tls.mode "mtls") $v.manager.enabled (not $v.tls.managerSecretName) -}}
{{- fail "tls.mode=mtls needs tls.managerSecretName: an existing Secret with tls.crt, tls.key and ca.crt (a cert-manager Certificate writes these) for the Manager." -}}
{{- end -}}
{{- $daemons := or $v.sidecar.enabled $v.sidecar.provideConfig $v.daemonset.enabled -}}
{{- if and (eq $v.tls.mode "mtls") $daemons (not $v.tls.daemonSecretName) -}}
{{- fail "tls.mode=mtls needs tls.daemonSecretName: an existing Secret with tls.crt, tls.key and ca.crt for the daemons (sidecar and DaemonSet). Set sidecar.provideConfig=false if this release runs no daemon." -}}
{{- end -}}
{{- if and (eq $v.tls.mode "insecure") $v.daemon.managerAddress -}}
{{- fail "daemon.managerAddress is set but tls.mode=insecure: an insecure Manager listens on loopback only, so no daemon in another pod can reach it. Use tls.mode=mtls, or leave daemon.managerAddress empty." -}}
{{- end -}}
{{- end -}}
